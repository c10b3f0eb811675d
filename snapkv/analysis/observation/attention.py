"""The paper's observation experiments (Section 3) as functions returning tidy DataFrames.

Each function runs one sequence through the model with the recorder and measures, per layer, how
well the observation window's votes predict what later tokens attend to. Definitions (PAPER.md):
voted set = top `top_k` (fraction of the prompt length) prefix positions by the window's summed
attention, no pooling; important set = prefix positions a generated token attends to above
`threshold`; hit rate = |important & voted| / |important| over heads and tokens.
"""

import itertools

import pandas as pd
import torch
from tqdm.auto import tqdm

from snapkv.analysis.observation.metrics import (
    REFERENCES,
    hit_rate_table,
    important_positions,
    metric_records,
    reference_set,
    reference_sets,
    sink_positions,
    voted_set,
)
from snapkv.core.compat import new_cache, prefill
from snapkv.core.compress import attach
from snapkv.core.hook import AttentionCall, Tap
from snapkv.core.policies import SnapKV
from snapkv.core.record import record_teacher_forced
from snapkv.core.selection import observation_attention


def _as_row(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    return ids[None] if ids.dim() == 1 else ids


def hit_rate_along_generation(model, input_ids, prompt_len: int, *, window_size: int = 128, steps: int = 4,
                              top_k: float | int = 0.05, threshold: float = 0.05,
                              generation_window: int | None = None, by_head: bool = False,
                              cache=None) -> pd.DataFrame:
    """Hit rate per layer for `steps` consecutive generation windows of one sequence (paper Fig. 2).

    input_ids: (1, prompt_len + response) or (prompt_len + response,): the prompt followed by the
    answer, fed by teacher forcing (the authors' protocol with a reference answer; pass the model's
    own greedy output for the generation protocol). generation_window: tokens per window (default
    window_size, as in the authors' code). cache: a cache holding a prefix of the prompt, continued on a copy
    (`record_teacher_forced`). Returns columns layer, window, hits, important, hit_rate, tokens.
    """
    generation_window = generation_window or window_size
    observation, generated = generation_attention(model, input_ids, prompt_len, window_size=window_size, steps=steps,
                                                  generation_window=generation_window, cache=cache)
    return hit_rate_table(observation, generated, window_size=window_size, generation_window=generation_window,
                          top_k=top_k, threshold=threshold, by_head=by_head)


def generation_attention(model, input_ids, prompt_len: int, *, window_size: int, steps: int, generation_window: int,
                         cache=None) -> tuple[dict, dict]:
    """The recording behind `hit_rate_along_generation` (its arguments, checked the same way), for a caller
    that reads it more than once: ({layer: observation attention}, {layer: the answer's first
    steps * generation_window rows})."""
    ids = _as_row(input_ids)
    needed = prompt_len + steps * generation_window
    if ids.shape[1] < needed:
        raise ValueError(f"input_ids has {ids.shape[1]} tokens; {steps} windows of {generation_window} after a "
                         f"{prompt_len}-token prompt need {needed}: lower steps or generation_window")
    if prompt_len <= window_size:
        raise ValueError(f"prompt_len ({prompt_len}) must exceed window_size ({window_size})")
    return teacher_forced_attention(model, ids[:, :needed], prompt_len, window_size, cache=cache)


def teacher_forced_attention(model, input_ids, prompt_len: int, window_size: int, cache=None) -> tuple[dict, dict]:
    """Record prompt + answer (teacher forcing): ({layer: observation attention}, {layer: answer rows});
    cache: one holding a prefix of the prompt (`record_teacher_forced`)."""
    ids = _as_row(input_ids)
    trace = record_teacher_forced(model, ids[:, :prompt_len], ids[:, prompt_len:], window_size=window_size,
                                  cache=cache)
    return ({layer: trace.observation_attention(layer) for layer in trace.layers},
            {layer: trace.generation_attention(layer) for layer in trace.layers})


def greedy_continuation(model, prompt_ids, new_tokens: int) -> torch.Tensor:
    """The model's own greedy answer, exactly `new_tokens` long (EOS suppressed), as (1, prompt + new)."""
    return greedy_continuations(model, [prompt_ids], new_tokens, batch_size=1)[0]


def greedy_continuations(model, prompts: list, new_tokens: int, batch_size: int = 4) -> list[torch.Tensor]:
    """`greedy_continuation` of each prompt, decoded `batch_size` prompts at a time as left-padded batches of
    similar lengths; each returned as (1, prompt + new), in the order of `prompts`.

    A batch decodes deterministically, but not bit for bit like its rows one by one (the padded matrix products
    round differently, ~1e-5 in the logits), so a greedy token can differ now and then: tests/analysis/observation
    pins how often. The answers only feed the hit-rate experiments; every exactness contract of the engine is
    checked on one-by-one decoding."""
    rows = [_as_row(prompt) for prompt in prompts]
    order = sorted(range(len(rows)), key=lambda i: rows[i].shape[1])
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id
    pad = int(pad[0] if isinstance(pad, (list, tuple)) else pad if pad is not None else 0)
    answers = [None] * len(rows)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="greedy answers", unit="batch", disable=len(starts) < 2, leave=False):
        chosen = order[start : start + batch_size]
        longest = max(rows[i].shape[1] for i in chosen)
        ids = torch.full((len(chosen), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(chosen), longest), dtype=torch.long)
        for slot, i in enumerate(chosen):
            n = rows[i].shape[1]
            ids[slot, longest - n :], mask[slot, longest - n :] = rows[i][0], 1
        with torch.no_grad():
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad).cpu()
        for slot, i in enumerate(chosen):
            answers[i] = torch.cat([rows[i], out[slot : slot + 1, longest:]], 1)
    return answers


def voted_overlap(model, sequences: list, document_len: int, *, window_size: int = SnapKV.window_size,
                  top_k: float | int = 0.05, references=REFERENCES) -> pd.DataFrame:
    """Overlap of the voted sets of several sequences that share their first `document_len` tokens
    (one document, different questions; paper v2 Fig. 4). The document runs through the model once.

    Each sequence's last `window_size` tokens (its question and answer) vote over the shared document;
    overlap(a, b) = |V_a & V_b| / k per head, averaged over heads. Returns columns layer, pair (a, b),
    reference ("snapkv", or a reference set of the same size: random sets drawn independently per
    question, recency/streaming sets, which ignore the question), overlap, and `chance` = k / document_len.
    """
    sequences = [_as_row(ids) for ids in sequences]
    document = sequences[0][:, :document_len]
    for ids in sequences:
        if not torch.equal(ids[:, :document_len], document):
            raise ValueError(f"the sequences differ within their first {document_len} tokens: pass the length of "
                             "the prefix they really share as document_len")
        if ids.shape[1] - window_size < document_len:
            raise ValueError(f"a sequence's observation window reaches into the shared document: use a "
                             f"window_size below {ids.shape[1] - document_len}")
    cache = new_cache(model)  # the document runs once; each question continues a copy of its cache
    with torch.no_grad():
        prefill(model, document.to(model.device), cache)
    votes = []
    for ids in sequences:
        trace = record_teacher_forced(model, ids, ids[:, :0], window_size=window_size, generation=False, cache=cache)
        votes.append({layer: trace.observation_attention(layer)[..., :document_len] for layer in trace.layers})
    k = int(top_k * document_len) if isinstance(top_k, float) else int(top_k)
    records = []
    for (a, va), (b, vb) in itertools.combinations(enumerate(votes), 2):
        for layer in va:
            set_a, set_b = (voted_set(v[layer], k, prefix_len=document_len) for v in (va, vb))
            pairs = {"snapkv": [(set_a, set_b)]}
            for kind in references:  # the same size; random: independent draws for the two questions
                draw = [reference_set(kind, set_a.shape, 0, k, seed=seed) for seed in (a, b)]
                pairs[kind] = [(draw[0], draw[1])]
            for reference, ((x, y),) in pairs.items():
                overlap = (x & y).sum(-1).float().mean().item() / k
                records.append(dict(layer=layer, pair=f"{a}-{b}", reference=reference, overlap=overlap,
                                    chance=k / document_len))
    return pd.DataFrame.from_records(records)


class WindowVotes(Tap):
    """A tap that, during a forward over a whole prompt (and maybe its answer), sums the attention of
    each of the last `n_windows` prompt windows over the prompt up to that window's end.

    votes[layer][j - 1]: float32 (batch, heads, 1, end_j) for window j (1 = the prompt's last window),
    end_j = prompt_len - (j - 1) * window_size. Costs n_windows x window x n per head, never n x n.
    """

    def __init__(self, prompt_len: int, window_size: int, n_windows: int):
        self.prompt_len, self.window_size, self.n_windows = prompt_len, window_size, n_windows
        self.votes: dict[int, list[torch.Tensor]] = {}

    def after_attention(self, call: AttentionCall) -> None:
        if call.past_length != 0 or call.query_length < self.prompt_len:
            return
        votes = []
        for j in range(1, self.n_windows + 1):
            end = self.prompt_len - (j - 1) * self.window_size
            rows = call.query[:, :, end - self.window_size : end]
            probs = observation_attention(rows, call.key[:, :, :end], scaling=call.scaling)
            votes.append(probs.sum(dim=-2, keepdim=True))
        self.votes[call.layer] = votes


def windows_along_prompt(model, input_ids, prompt_len: int, *, window_size: int = 128, n_windows: int = 20,
                         top_k: float | int = 0.05, threshold: float = 0.05, references=REFERENCES,
                         sink_size: int = 4) -> pd.DataFrame:
    """Hit rate of each of the last `n_windows` prompt windows used as the observation window (v2 Fig. 2).

    input_ids: prompt followed by the answer (teacher-forced). Window -1 is the real observation window,
    -2 the one before it, ...; window j votes over the positions before it, and its hit rate counts what
    the answer tokens attend to among those same positions. Columns: layer, prompt_window, reference
    and the metrics of `metrics.metric_records` (window is always 0: all answer tokens together).
    """
    ids = _as_row(input_ids)
    if prompt_len <= (n_windows + 1) * window_size:
        raise ValueError(f"a {prompt_len}-token prompt is too short for {n_windows} windows of {window_size} "
                         f"(it needs more than {(n_windows + 1) * window_size}): lower n_windows or window_size")
    if ids.shape[1] <= prompt_len:
        raise ValueError("input_ids holds no answer after the prompt: append the answer tokens")
    tap = WindowVotes(prompt_len, window_size, n_windows)
    with attach(model, tap):
        trace = record_teacher_forced(model, ids[:, :prompt_len], ids[:, prompt_len:], window_size=window_size)
    k = int(top_k * prompt_len) if isinstance(top_k, float) else int(top_k)
    records = []
    for layer in trace.layers:
        rows = trace.generation_attention(layer)
        important = important_positions(rows, threshold)  # once per layer: every window reads a prefix of it
        for j, votes in enumerate(tap.votes[layer], start=1):
            end = votes.shape[-1]
            voted = voted_set(votes, k, prefix_len=end - window_size)
            sets = reference_sets(voted, window_size, references, sink_size=sink_size)
            records += metric_records(rows[..., :end], sets, sink_positions(votes, sink_size), window=window_size,
                                      threshold=threshold, generation_window=rows.shape[2], important=important,
                                      layer=layer, prompt_window=-j)
    return pd.DataFrame.from_records(records)
