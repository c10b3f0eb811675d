"""Long-context quality runs: every method answers every prompt, from one shared prefill per prompt.

Prompts are built from token ids so that lengths and needle depths are exact:

    context_ids = chat-template head + context (haystack with inserted facts, or a source-file prefix)
    tail_ids    = "\\n\\n" + question + end of the user turn + assistant header + answer prefix

Two compression modes (`MODES`):
  question-aware     the whole prompt (context + tail) is prefilled, then compressed at the first decoding
                     step: the question sits inside the observation window (the paper's setting);
  question-agnostic  the context alone is prefilled and compressed (`compress_before_next_forward`), then the
                     tail is fed in one forward on the compressed cache, then greedy decoding.

Shared prefill (`answers_with_shared_prefill`): prefill is the dominant cost and it does not depend on
the eviction policy (every policy prefills with the full cache), so each prompt is prefilled ONCE by an
observing compression session, and every method then decodes from its own fork: a copy of the KV cache
(`copy_cache`) and `observer.fork(policy)`, a session that starts from what the observer saw (what the
policies `observe`: last window queries, H2O's accumulated attention, ...). Both modes share that prefill (the
context part is prefilled first; the question-agnostic forks are taken there; the tail is then prefilled on top
for the question-aware forks).
The result equals running `model.generate` inside `snapkv.compress(model, policy)` once per method
(pinned by tests/analysis/quality/test_quality.py), at the cost of one prefill per prompt instead of one per method.

Resuming (`evaluate(..., checkpoint=FILE)`): each finished prompt's rows are appended to a JSONL file under a key of
everything that decides them (model fingerprint, prompt ids, methods with their policies, modes, prefill chunk, and
the package's source code), so a long run that is interrupted continues where it stopped, and one rerun after a code
change starts again; the notebooks delete the file once their table is saved (`drop_checkpoint`).

Tables are tidy: one row per (prompt, mode, method, budget) with `score` in [0, 1] (needle and key
retrieval: 1 if the answer contains the value; multi-value and variable tracking: the fraction of the
expected values/names present; code: difflib edit similarity of the first answer line) and `correct`
(score == 1; for code: the line is reproduced exactly).
"""

import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from snapkv.analysis.quality.methods import CALIBRATION_THRESHOLD, MODES, Method, check_lengths_fit, method_grid
from snapkv.analysis.quality.prompts import QualityPrompt, check_samples
from snapkv.analysis.quality.scoring import first_code_line, prefix_score, score_answer
from snapkv.analysis.quality.statistics import calibrate
from snapkv.analysis.text import chat_parts, token_ids
from snapkv.core.compat import copy_cache, forward, new_cache, prefill
from snapkv.core.compress import CompressionSession, attach
from snapkv.core.environment import weights_fingerprint

DEFAULT_PREFILL_CHUNK = 2048


@dataclass
class GeneratedAnswer:
    """Greedy tokens of one method; `logits` (steps, vocab) when asked for; `cache_slots` = prompt slots a head
    keeps, averaged over compressed layers and heads (the prompt length when nothing was evicted); `seconds` of
    decoding;
    `kept_positions` {layer: (1, cache_heads, kept)} prompt positions each head kept (empty for the full cache)."""

    tokens: list[int]
    logits: torch.Tensor | None
    cache_slots: float
    seconds: float
    kept_positions: dict = dataclasses.field(default_factory=dict)


def _greedy(model, cache, logits: torch.Tensor, max_new_tokens: int, stop_ids, stop, keep_logits: bool):
    tokens, rows = [], []
    for step in range(max_new_tokens):
        if keep_logits:
            rows.append(logits[0].clone())
        token = int(logits[0].argmax())
        tokens.append(token)
        if token in stop_ids or step == max_new_tokens - 1 or (stop is not None and stop(tokens)):
            break
        ids = torch.tensor([[token]], device=model.device)
        logits = forward(model, ids, cache).logits[:, -1].float()
    return tokens, (torch.stack(rows) if keep_logits else None)


def _cache_slots(session: CompressionSession, prompt_length: int) -> float:
    """Prompt slots a head keeps, averaged over the compressed layers and their heads (the prompt length when
    nothing was compressed): per-layer (PyramidKV) and per-head (AdaKV) budgets average to the budget."""
    if not session.kept_positions:
        return float(prompt_length)
    kept = [(positions >= 0).sum(-1).float().mean() for positions in session.kept_positions.values()]
    return float(torch.stack(kept).mean())


def answers_with_shared_prefill(model, context_ids, tail_ids, methods: Sequence[Method], *,
                                modes: Sequence[str] = ("question-aware",), max_new_tokens: int = 16,
                                stop_ids: Sequence[int] = (), stop: Callable[[list[int]], bool] | None = None,
                                prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK, keep_logits: bool = False
                                ) -> dict[tuple[str, str, int | None], GeneratedAnswer]:
    """Greedy answers of every method in every mode, from ONE prefill of the prompt.

    context_ids, tail_ids: token ids (lists or 1-D tensors); the prompt is context + tail. Returns
    {(mode, method name, budget): GeneratedAnswer}. Equals, per method, `model.generate` inside
    `snapkv.compress(model, policy)` on the whole prompt (question-aware), or prefilling the context inside
    it, `compress_before_next_forward()`, feeding the tail in one forward and decoding greedily
    (question-agnostic); prefill runs in chunks of `prefill_chunk_size` tokens (None: one forward).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown or modes}: choose from {MODES}")
    device = model.device
    context = torch.as_tensor(list(context_ids), dtype=torch.long, device=device)[None]
    tail = torch.as_tensor(list(tail_ids), dtype=torch.long, device=device)[None]
    if tail.shape[1] < 2:
        raise ValueError("tail_ids needs at least 2 tokens (a 1-token forward would count as a decoding step)")
    policies = [m.policy for m in methods]
    window = max([max(p.window_size, 1) for p in policies] + [1])
    if prefill_chunk_size is not None and prefill_chunk_size < window:
        raise ValueError(f"prefill_chunk_size ({prefill_chunk_size}) must be at least the window ({window})")
    if context.shape[1] < window:
        raise ValueError(f"the context has {context.shape[1]} tokens, fewer than the window ({window})")
    observer = CompressionSession.observer(model, policies, prefill_chunk_size)
    cache = new_cache(model)
    results = {}

    def run(mode: str, first_logits_of) -> None:
        for method in methods:
            session = observer.fork(method.policy)
            forked = copy_cache(cache)
            start = time.perf_counter()
            with attach(model, session):
                logits = first_logits_of(session, forked)
                tokens, rows = _greedy(model, forked, logits, max_new_tokens, set(stop_ids), stop, keep_logits)
            prompt_length = context.shape[1] + (tail.shape[1] if mode == "question-aware" else 0)
            results[(mode, method.name, method.budget)] = GeneratedAnswer(
                tokens, rows, _cache_slots(session, prompt_length), time.perf_counter() - start,
                dict(session.kept_positions))

    def agnostic_first_logits(session, forked):
        session.compress_before_next_forward()
        return forward(model, tail, forked).logits[:, -1].float()

    with torch.no_grad():
        with attach(model, observer):
            prefill(model, context, cache, chunk_size=prefill_chunk_size)
        if "question-agnostic" in modes:
            run("question-agnostic", agnostic_first_logits)
        if "question-aware" in modes:
            with attach(model, observer):
                last = prefill(model, tail, cache, chunk_size=prefill_chunk_size, logits_to_keep=0)
            aware_logits = last[:, -1].float()
            run("question-aware", lambda session, forked: aware_logits)
    return results


# -- experiments ----------------------------------------------------------------------------------------------


def stop_ids_of(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        found = tokenizer.convert_tokens_to_ids(token) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(found, int) and found != getattr(tokenizer, "unk_token_id", None):
            ids.add(found)
    return {i for i in ids if i is not None}


def _line_stop(tokenizer):
    def stop(tokens: list[int]) -> bool:  # one complete line (of code: fences skipped) is enough
        complete_lines = tokenizer.decode(tokens).split("\n")[:-1]
        return first_code_line("\n".join(complete_lines)) != ""
    return stop


def methods_for(prompt: QualityPrompt, methods: Sequence[Method]) -> list[Method]:
    """The methods a prompt runs: a budget >= its length keeps the whole prompt, i.e. equals the full cache."""
    return [m for m in methods if m.budget is None or m.budget < prompt.length]


def method_answers(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *, modes, desc: str,
             prefill_chunk_size: int | None, progress: bool = True):
    """Yield (prompt, mode, method name, budget, answer text, GeneratedAnswer, prefill seconds) for every prompt,
    from one shared prefill per prompt; methods whose budget is >= the prompt's length are skipped."""
    stop_ids = stop_ids_of(tokenizer)
    bar = tqdm(prompts, desc=desc, unit="prompt", disable=not progress)
    for prompt in bar:
        bar.set_postfix_str(f"{prompt.task} {prompt.length} tokens")
        chosen = methods_for(prompt, methods)
        stop = _line_stop(tokenizer) if prompt.stop_at_newline else None
        start = time.perf_counter()
        answers = answers_with_shared_prefill(model, prompt.context_ids, prompt.tail_ids, chosen, modes=modes,
                                              max_new_tokens=prompt.max_new_tokens, stop_ids=stop_ids, stop=stop,
                                              prefill_chunk_size=prefill_chunk_size)
        prefill_seconds = time.perf_counter() - start - sum(a.seconds for a in answers.values())
        for (mode, name, budget), answer in answers.items():
            text = tokenizer.decode(answer.tokens, skip_special_tokens=True)
            yield prompt, mode, name, budget, text, answer, prefill_seconds
    bar.close()


def model_fingerprint(model, tokenizer) -> str:
    """sha256 of what decides a model's answers besides the prompt: its config (without its name or path), its
    parameters' dtypes, its weights (`weights_fingerprint`, the one KV packs store), and how the tokenizer writes
    a calibration prompt's parts (chat head and end, a fact sentence)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "name_or_path")}
    dtypes = sorted({str(parameter.dtype) for parameter in model.parameters()})
    head, end = chat_parts(tokenizer)
    probe = token_ids(tokenizer, "\nThe registration number of the teal heron is 4096512.\n")
    payload = dict(config=config, dtypes=dtypes, weights=weights_fingerprint(model), tokenizer=[head, end, probe])
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def code_digest() -> str:
    """sha256 of the snapkv package's Python sources (the code that decides a checkpoint's rows)."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]  # the snapkv package
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _prompt_key(fingerprint: str, code: str, prompt: QualityPrompt, methods: Sequence[Method], modes,
                prefill_chunk_size) -> str:
    """The checkpoint key of one prompt's rows: sha256 of everything that decides them."""
    payload = dict(model=fingerprint, code=code, ids=hashlib.sha256(str(list(prompt.ids)).encode()).hexdigest(),
                   prompt=[prompt.task, prompt.length, prompt.depth, prompt.sample, prompt.max_new_tokens,
                           prompt.stop_at_newline, list(prompt.expected), len(prompt.context_ids)],
                   methods=[[m.name, m.budget, repr(m.policy)] for m in methods], modes=list(modes),
                   prefill_chunk_size=prefill_chunk_size)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read_checkpoint(path: Path) -> dict[str, list[dict]]:
    """{key: rows} of a checkpoint file; a line cut short by an interruption is ignored."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[entry["key"]] = entry["rows"]
    return done


def drop_checkpoint(path: str | Path) -> None:
    """Delete an `evaluate` checkpoint once the tables it fed are saved, and its folder if nothing else is in it."""
    path = Path(path)
    path.unlink(missing_ok=True)
    if path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()


def evaluate(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *,
             modes: Sequence[str] = ("question-aware",), prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK,
             progress: bool = True, checkpoint: str | Path | None = None) -> pd.DataFrame:
    """Run every method in every mode on every prompt (one shared prefill per prompt).

    Methods whose budget is >= the prompt's target length are skipped (they keep the whole prompt, i.e.
    equal the full cache). Returns one row per (prompt, mode, method, budget): task, length, prompt_tokens,
    depth, needle_position, sample, mode, method, budget, score, correct, prefix_score (single-value tasks,
    see `prefix_score`), answer, expected, cache_slots, decode_seconds, prefill_seconds (the prompt's shared
    prefill).
    checkpoint: a JSONL file to resume from: prompts whose rows it holds under the same key (model, prompt,
    methods, modes, prefill chunk, `code_digest`) are not run again, and each prompt run here is appended as it
    finishes; `drop_checkpoint` deletes it.
    """
    if not prompts:
        raise ValueError("no prompts to evaluate")
    check_lengths_fit({p.length for p in prompts}, model, max(p.max_new_tokens for p in prompts))
    keys, done = {}, {}
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        fingerprint, code = model_fingerprint(model, tokenizer), code_digest()
        keys = {id(p): _prompt_key(fingerprint, code, p, methods_for(p, methods), modes, prefill_chunk_size)
                for p in prompts}
        done = _read_checkpoint(checkpoint)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    todo = [p for p in prompts if keys.get(id(p)) not in done]
    computed: dict[int, list[dict]] = {}
    answers = method_answers(model, tokenizer, todo, methods, modes=modes, desc="prompts",
                             prefill_chunk_size=prefill_chunk_size, progress=progress)
    for prompt_id, group in itertools.groupby(answers, key=lambda item: id(item[0])):  # one prompt's answers
        computed[prompt_id] = [_row(*item) for item in group]
        if checkpoint is not None:
            with checkpoint.open("a") as file:
                file.write(json.dumps(dict(key=keys[prompt_id], rows=computed[prompt_id])) + "\n")
    rows = [row for p in prompts for row in (computed[id(p)] if id(p) in computed else done[keys[id(p)]])]
    table = pd.DataFrame.from_records(rows)
    table["budget"] = table["budget"].astype("Int64")
    return table


def _row(prompt: QualityPrompt, mode: str, name: str, budget, text: str, answer, prefill_seconds: float) -> dict:
    """One row of `evaluate`'s table."""
    score, correct = score_answer(prompt, text)
    partial = prefix_score(text, prompt.expected[0]) if len(prompt.expected) == 1 else float("nan")
    return dict(task=prompt.task, length=prompt.length, prompt_tokens=prompt.prompt_tokens, depth=prompt.depth,
                needle_position=prompt.needle_position, sample=prompt.sample, mode=mode, method=name, budget=budget,
                score=score, correct=correct, prefix_score=partial, answer=text, expected=" | ".join(prompt.expected),
                cache_slots=answer.cache_slots, decode_seconds=round(answer.seconds, 3),
                prefill_seconds=round(prefill_seconds, 3))


def needle_tokens(tokenizer, prompt: QualityPrompt) -> pd.DataFrame:
    """The tokens of a needle prompt's inserted sentence: index (in the sentence), position (in the prompt),
    token (its text) and in_value (it holds part of the value the question asks for)."""
    if prompt.needle is None or prompt.needle_position is None:
        raise ValueError(f"prompt of task {prompt.task!r} has no needle: pass a prompt from needle_prompts")
    text = f"\n{prompt.needle}\n"
    ids = token_ids(tokenizer, text)
    if list(prompt.ids[prompt.needle_position : prompt.needle_position + len(ids)]) != ids:
        raise ValueError("the needle's tokens are not at prompt.needle_position: was the prompt built with "
                         "another tokenizer?")
    value_start = text.index(prompt.expected[0])
    value_end = value_start + len(prompt.expected[0])
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    starts = [0] + ends[:-1]
    return pd.DataFrame(dict(index=range(len(ids)), position=[prompt.needle_position + i for i in range(len(ids))],
                             token=[tokenizer.decode([t]) for t in ids],
                             in_value=[s < value_end and e > value_start for s, e in zip(starts, ends)]))


def needle_retention(tokens: pd.DataFrame, kept_positions: dict) -> pd.DataFrame:
    """`tokens` (from `needle_tokens`) with kept_share: the share of (layer, KV head) pairs whose kept prompt
    positions ({layer: (1, heads, kept)}, as in `GeneratedAnswer`) hold the token, over the compressed layers
    only (sliding-window layers, e.g. Gemma 3's, are never compressed and hold no kept positions); 1.0 when
    nothing was evicted. compressed_layers: how many layers the share is over."""
    if not kept_positions:
        return tokens.assign(kept_share=1.0, compressed_layers=0)
    wanted = torch.tensor(tokens.position.to_numpy())
    held = torch.cat([(kept[0].cpu()[:, :, None] == wanted).any(1) for kept in kept_positions.values()])
    return tokens.assign(kept_share=held.float().mean(0).numpy(),  # over (compressed layers x heads)
                         compressed_layers=len(kept_positions))


def needle_retention_experiment(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *,
                                prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK) -> pd.DataFrame:
    """Which tokens of the needle sentence each method keeps (question-aware), with its answer: one row per
    (prompt, method, budget, needle token) with length, depth, sample, answer, score and the columns of
    `needle_retention`. Methods whose budget is >= the prompt's length are skipped, as in `evaluate`."""
    if not prompts or not methods:
        raise ValueError("needle_retention_experiment needs at least one needle prompt and one method")
    tokens = {id(prompt): needle_tokens(tokenizer, prompt) for prompt in prompts}
    frames = [needle_retention(tokens[id(prompt)], answer.kept_positions).assign(
                  length=prompt.length, depth=prompt.depth, sample=prompt.sample, method=name, budget=budget,
                  answer=text, score=score_answer(prompt, text)[0])
              for prompt, _, name, budget, text, answer, _ in method_answers(
                  model, tokenizer, prompts, methods, modes=("question-aware",), desc="needle tokens",
                  prefill_chunk_size=prefill_chunk_size)]
    table = pd.concat(frames, ignore_index=True)
    table["budget"] = table["budget"].astype("Int64")
    return table


def calibrated_evaluate(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *,
                        threshold: float = CALIBRATION_THRESHOLD, calibration_samples: int = 3,
                        modes: Sequence[str] = ("question-aware",),
                        prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK, progress: bool = True,
                        checkpoint: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Calibrate, then compare: the full cache alone answers the first `calibration_samples` prompts of every
    (task, length) group (in the first mode); groups scoring below `threshold` are dropped (the model cannot
    do them even uncompressed, so compression has nothing to lose); every method then runs on all prompts
    of the kept groups. Returns (table, calibration) - see `evaluate` (and its `checkpoint`) and `calibrate`."""
    groups: dict[tuple, list[QualityPrompt]] = {}
    for prompt in prompts:
        groups.setdefault((prompt.task, prompt.length), []).append(prompt)
    first = [p for group in groups.values() for p in group[:check_samples(calibration_samples)]]
    full = [m for m in method_grid(["full"], [], ())]
    calibration_table = evaluate(model, tokenizer, first, full, modes=modes[:1], prefill_chunk_size=prefill_chunk_size,
                                 progress=progress, checkpoint=checkpoint)
    calibration = calibrate(calibration_table, threshold)
    kept = {tuple(key) for key in calibration.loc[calibration.kept, ["task", "length"]].itertuples(index=False)}
    chosen = [p for key, group in groups.items() if key in kept for p in group]
    if not chosen:
        return calibration_table.iloc[0:0], calibration
    return evaluate(model, tokenizer, chosen, methods, modes=modes, prefill_chunk_size=prefill_chunk_size,
                    progress=progress, checkpoint=checkpoint), calibration


