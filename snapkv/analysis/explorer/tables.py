"""Explore a saved trace, one head at a time: what the observation window votes for, what each generated
token attends to, and which prompt positions SnapKV would keep under a chosen budget.

Pure functions of a `Trace` (loaded with `Trace.load`, no model needed): DataFrames and figures
(plotly for the interactive view, matplotlib for the static one). `notebooks/09_explorer.ipynb` wires
them to widgets. Kept positions are recomputed from the trace's observation attention with the engine's
own functions (the policy's `select_from_votes`: pooling, GQA aggregation, its choice + window), so they
are what `snapkv.SnapKV(window_size, budget, kernel_size, pooling, gqa)` (or any registered method that scores
with the window's votes: AdaKV, PyramidKV, ChunkKV, ... with the same settings) keeps for that prompt. A method
that scores with what a trace does not hold (keys, values, hidden states) is shown as "recorded": the positions
the engine kept when the trace was recorded under `snapkv.compress(model, policy)`.

Positions are the row's own prompt positions (left padding cut away, `Trace(..., row=)` getters).
"""

import dataclasses
import math
import re

import numpy as np
import pandas as pd
import torch

from snapkv.core.policies import SnapKV, check_int
from snapkv.core.registry import method_names, method_policy, needs_tokenizer
from snapkv.core.selection import GQA_MODES, POOLINGS, aggregate_gqa, pool_scores
from snapkv.core.trace import Trace

RECORDED = "recorded"  # the positions the engine kept when the trace was recorded under compression


def explorer_methods(trace: Trace | None = None) -> list[str]:
    """The methods the explorer can show: every registered method that scores with the window's votes (what a
    trace holds), then "recorded" when `trace` was recorded under compression."""
    voting = [name for name in method_names()
              if not needs_tokenizer(name) and isinstance(method_policy(name, SnapKV.max_capacity_prompt), SnapKV)]
    compressed = trace is not None and bool(trace.metadata.get("compressed_layers"))
    return voting + [RECORDED] * compressed


# -- tokens ----------------------------------------------------------------------------------------
def load_tokenizer(trace: Trace):
    """The tokenizer the trace names (metadata "tokenizer", else "model_id"), loaded without a network:
    an embedded model's converted folder, a local folder, or the local Hugging Face cache.
    None when none of these has it (labels then show token ids)."""
    from transformers import AutoTokenizer

    from snapkv.core import loading

    name = trace.metadata.get("tokenizer") or trace.metadata.get("model_id")
    if not name:
        return None
    candidates = []
    if name in loading.EMBEDDED_MODELS:
        try:
            candidates.append(str(loading.embedded_model_folder(name)))
        except loading.MissingModelError:
            pass
    candidates.append(name)
    for candidate in candidates:
        try:
            return AutoTokenizer.from_pretrained(candidate, local_files_only=True)
        except Exception:  # noqa: BLE001 (OSError, ValueError, hub errors: all mean "not available here")
            continue
    return None


def _label(token_id: int, tokenizer) -> str:
    if tokenizer is None:
        return f"id {token_id}"
    text = tokenizer.decode([token_id])
    return text.replace("\n", "\u23ce").replace("\t", "\u21e5") or f"id {token_id}"


def token_labels(trace: Trace, tokenizer=None, row: int = 0) -> tuple[list[str], list[str]]:
    """(prompt labels, generated labels) of one row: each token decoded alone (newline shown as ⏎), or
    "id N" without a tokenizer; "position N" when the trace holds no input_ids. Generated label i names
    the token whose query made generated row i."""
    prompt_length = int(trace.prompt_lengths[row])
    ids = trace.input_ids
    if ids is None:
        prompt = [f"position {p}" for p in range(prompt_length)]
        return prompt, [f"step {i}" for i in range(trace.generated)]
    pad = int(trace.pad_lengths[row])
    row_ids = ids[row, pad:].tolist()
    labels = [_label(t, tokenizer) for t in row_ids]
    prompt, fed = labels[:prompt_length], labels[prompt_length:]
    generated = fed[: trace.generated]  # row i: the query of fed token i (a generated or teacher-forced token)
    generated += [f"step {i}" for i in range(len(generated), trace.generated)]
    return prompt, generated


# -- selection on a trace ---------------------------------------------------------------------------
def kv_heads_of(trace: Trace, layer: int) -> int | None:
    """Key/value heads of the recorded model: metadata "num_key_value_heads" when recorded, else the cache
    heads of a compressed layer when fewer than the query heads, else None (unknown)."""
    recorded = trace.metadata.get("num_key_value_heads")
    if recorded:
        return int(recorded)
    kept = trace.kept_positions(layer)
    heads = trace.metadata.get("num_attention_heads")
    if kept is not None and heads and kept.shape[1] < heads:
        return int(kept.shape[1])
    return None


def _selection(trace: Trace, layer: int, budget: int, window_size: int | None, kernel_size: int,
                     pooling: str, gqa: str | None, kv_heads: int | None) -> tuple[int, int | None, str]:
    gqa = default_gqa(trace) if gqa is None else gqa
    recorded = trace.metadata["window_size"]
    window_size = recorded if window_size is None else window_size
    if check_int("window_size", window_size, 1) > recorded:
        raise ValueError(f"window_size must be at most the recorded window ({recorded}), got {window_size}")
    if check_int("budget", budget, 1) <= window_size:
        raise ValueError(f"budget ({budget}) must be an int that exceeds window_size ({window_size}): "
                         "the budget includes the observation window")
    if check_int("kernel_size", kernel_size, 1) % 2 == 0:
        raise ValueError(f"kernel_size must be odd so pooling keeps positions aligned, got {kernel_size}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {GQA_MODES}, got {gqa!r}")
    if gqa != "expand":
        kv_heads = kv_heads or kv_heads_of(trace, layer)
        if kv_heads is None:
            raise ValueError(f"gqa={gqa!r} needs the model's key/value head count, which this trace does not "
                             "record: pass kv_heads= (config.num_key_value_heads), or use gqa='expand'")
    return window_size, kv_heads, gqa


def window_votes(trace: Trace, layer: int, *, window_size: int | None = None, row: int = 0) -> torch.Tensor:
    """The observation window's summed attention over the prefix (Algorithm 1, step 3), per query head.

    Uses the last `window_size` recorded window queries (default: all). float32 (heads, prompt_len - window).
    """
    observation = trace.observation_attention(layer, row=row)  # (heads, window, n)
    window = observation.shape[-2] if window_size is None else window_size
    n = observation.shape[-1]
    return observation[:, -window:, : n - window].sum(dim=1)


def kept_positions(trace: Trace, layer: int, *, budget: int, window_size: int | None = None,
                   kernel_size: int = SnapKV.kernel_size, pooling: str = SnapKV.pooling, method: str = "snapkv",
                   gqa: str | None = None, kv_heads: int | None = None, row: int = 0) -> torch.Tensor:
    """Prompt positions `method` (a registered method that votes with the window: `explorer_methods()`; its
    pooling and gqa replaced by these) keeps per cache head under `budget` (window included; PyramidKV: its budget
    for this layer), ascending; "recorded": what the engine kept when the trace was recorded.

    long (cache_heads, kept); cache_heads = query heads for gqa="expand", else kv_heads. AdaKV's heads keep
    different numbers: their shorter rows start with -1. The policy's own `select_from_votes` on the trace's
    recorded window attention, so it is what the engine keeps for that prompt.
    """
    known = explorer_methods(trace)
    if method not in known:
        raise ValueError(f"method must be one of {', '.join(known)}, got {method!r} (a method that scores with "
                         "more than the window's votes shows as 'recorded' in a trace recorded under it)")
    if method == RECORDED:
        kept = trace.kept_positions(layer, row=row)
        n = trace.observation_attention(layer, row=row).shape[-1]
        return torch.arange(n).expand(trace.metadata["num_attention_heads"], n).clone() if kept is None else kept
    window_size, kv_heads, gqa = _selection(trace, layer, budget, window_size, kernel_size, pooling, gqa, kv_heads)
    if method == "chunkkv" and gqa == "expand":
        gqa = "mean"  # ChunkKV keeps the same chunks for every head
    policy = dataclasses.replace(method_policy(method, budget, window_size=window_size, kernel_size=kernel_size),
                                 pooling=pooling, gqa=gqa)
    votes = window_votes(trace, layer, window_size=window_size, row=row)
    heads, prefix = votes.shape
    n = prefix + window_size
    sliding = set(trace.metadata.get("sliding_layers") or ())
    layer_budget = policy.layer_budget(layer, n, tuple(x for x in trace.layers if x not in sliding) or (layer,))
    if n <= layer_budget:
        return torch.arange(n).expand(policy.cache_heads(heads, kv_heads or heads), n).clone()
    return policy.select_from_votes(votes[None], layer_budget, kv_heads or heads)[0]


def kept_mask(kept: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) bool: True at the positions of one cache head's `kept` row (-1 entries mark nothing)."""
    return torch.zeros(n, dtype=torch.bool).index_fill_(0, kept[kept >= 0], True)


def default_gqa(trace: Trace) -> str:
    """The gqa mode of the policy the trace was recorded under, else "mean" (the engine's default) when the
    key/value head count is known, else "expand" (one cache head per query head)."""
    match = re.search(r"gqa='(\w+)'", str(trace.metadata.get("policy") or ""))
    if match and match.group(1) in GQA_MODES:
        return match.group(1)
    return "mean" if kv_heads_of(trace, trace.layers[0]) else "expand"


def cache_head_of(head: int, heads: int, cache_heads: int) -> int:
    """The cache head serving query head `head` (heads // cache_heads query heads share one)."""
    return head // (heads // cache_heads)


def generation_rows(trace: Trace, layer: int, row: int = 0) -> tuple[torch.Tensor, str]:
    """What generation attended to over the prompt, dense float32 (heads, rows, prompt_len_i), and what a row is.

    reducer "raw": one row per generated token; "window_sum": the mean row of each window of `reduce_window`
    tokens; "topk": one row per token with only its recorded top-k positions non-zero.
    """
    if not trace.metadata.get("generation"):
        raise ValueError("this trace was recorded with generation=False: it holds no generated rows to explore; "
                         "record again with generation=True")
    if trace.reducer == "raw":
        return trace.generation_attention(layer, row=row), "token"
    if trace.reducer == "window_sum":
        sums = trace.generation_window_sums(layer, row=row)
        counts = trace.window_token_counts.clamp(min=1).to(sums.dtype)
        return sums / counts[None, :, None], f"window of {trace.metadata['reduce_window']} tokens"
    positions, values = trace.generation_topk(layer, row=row)
    heads, steps, _ = positions.shape
    dense = torch.zeros(heads, steps, int(trace.prompt_lengths[row]))
    return dense.scatter_(-1, positions.clamp(min=0), values), f"token (top-{positions.shape[-1]} only)"


# -- tables ----------------------------------------------------------------------------------------
def head_table(trace: Trace, layer: int, head: int, *, budget: int, window_size: int | None = None,
               kernel_size: int = SnapKV.kernel_size, pooling: str = SnapKV.pooling, method: str = "snapkv",
               gqa: str | None = None, kv_heads: int | None = None,
               tokenizer=None, row: int = 0) -> pd.DataFrame:
    """One row per prompt position for one query head: token, vote (window's summed attention), score
    (pooled, GQA-aggregated: what top-k ranks), kept (under the budget), in_window, and generation's mean
    and max attention on it (NaN without generated rows)."""
    window_size, kv_heads, gqa = _selection(trace, layer, budget, window_size, kernel_size, pooling, gqa, kv_heads)
    _check_head(trace, head)
    votes = window_votes(trace, layer, window_size=window_size, row=row)
    heads, prefix = votes.shape
    n = prefix + window_size
    every_head = kept_positions(trace, layer, budget=budget, window_size=window_size, kernel_size=kernel_size,
                                pooling=pooling, method=method, gqa=gqa, kv_heads=kv_heads, row=row)
    cache_head = cache_head_of(head, heads, every_head.shape[0])  # ChunkKV: one row per kv head, whatever gqa
    kept = every_head[cache_head]
    scores = aggregate_gqa(pool_scores(votes[None], kernel_size, pooling), kv_heads or heads, gqa)[0]
    score_head = cache_head_of(head, heads, scores.shape[0])
    prompt_labels, _ = token_labels(trace, tokenizer, row)
    table = pd.DataFrame({
        "layer": layer, "head": head, "cache_head": cache_head, "position": np.arange(n), "token": prompt_labels,
        "vote": np.concatenate([votes[head].numpy(), np.full(window_size, np.nan)]),
        "score": np.concatenate([scores[score_head].numpy(), np.full(window_size, np.nan)]),
        "kept": np.isin(np.arange(n), kept.numpy()),
        "in_window": np.arange(n) >= prefix,
    })
    rows = generation_rows_or_none(trace, layer, row)
    table["generation_mean"] = rows[0][head].mean(0).numpy() if rows else np.nan
    table["generation_max"] = rows[0][head].amax(0).numpy() if rows else np.nan
    return table


def generation_table(trace: Trace, layer: int, head: int, *, budget: int, window_size: int | None = None,
                     kernel_size: int = SnapKV.kernel_size, pooling: str = SnapKV.pooling, method: str = "snapkv",
                     gqa: str | None = None, kv_heads: int | None = None, tokenizer=None, row: int = 0,
                     sink_size: int = 4) -> pd.DataFrame:
    """One row per generated row for one query head: its token, attention mass on the prompt, the share of
    that mass on the kept positions (`kept_share`), the same share leaving out the first `sink_size` positions
    (`kept_share_after_sink`: attention sinks take much of the mass and are easy to keep), and whether its most
    attended prompt position is kept."""
    _check_head(trace, head)
    rows, _ = generation_rows(trace, layer, row)
    attention = rows[head]  # (steps, n)
    window_size, kv_heads, gqa = _selection(trace, layer, budget, window_size, kernel_size, pooling, gqa, kv_heads)
    heads = rows.shape[0]
    kept = kept_positions(trace, layer, budget=budget, window_size=window_size, kernel_size=kernel_size,
                          pooling=pooling, method=method, gqa=gqa, kv_heads=kv_heads, row=row)
    kept = kept[cache_head_of(head, heads, kept.shape[0])]
    mask = kept_mask(kept, attention.shape[-1])
    on_prompt = attention.sum(-1)
    after_sink = attention[:, sink_size:]
    _, generated_labels = token_labels(trace, tokenizer, row)
    return pd.DataFrame({
        "layer": layer, "head": head, "step": np.arange(attention.shape[0]),
        "token": generated_labels[: attention.shape[0]] if trace.reducer != "window_sum"
        else [f"window {i}" for i in range(attention.shape[0])],
        "prompt_mass": on_prompt.numpy(),
        "kept_share": (attention[:, mask].sum(-1) / on_prompt.clamp(min=1e-12)).numpy(),
        "kept_share_after_sink": (after_sink[:, mask[sink_size:]].sum(-1)
                                  / after_sink.sum(-1).clamp(min=1e-12)).numpy(),
        "top_position": attention.argmax(-1).numpy(),
        "top_kept": mask[attention.argmax(-1)].numpy(),
    })


def kept_attention_table(trace: Trace, *, budget: int, window_size: int | None = None,
                         kernel_size: int = SnapKV.kernel_size, pooling: str = SnapKV.pooling, method: str = "snapkv",
                         gqa: str | None = None, kv_heads: int | None = None, row: int = 0,
                         sink_size: int = 4) -> pd.DataFrame:
    """Per layer and query head: the mean share of generation's prompt attention that falls on the positions
    `method` keeps under `budget` (`kept_share`; `kept_share_after_sink` leaves out the first `sink_size`
    positions), to find the heads worth a closer look."""
    records = []
    for layer in trace.layers:
        rows, _ = generation_rows(trace, layer, row)
        heads = rows.shape[0]
        w, kv, gqa_mode = _selection(trace, layer, budget, window_size, kernel_size, pooling, gqa, kv_heads)
        kept = kept_positions(trace, layer, budget=budget, window_size=w, kernel_size=kernel_size, pooling=pooling,
                              method=method, gqa=gqa_mode, kv_heads=kv, row=row)
        cache_heads = kept.shape[0]
        on_prompt = rows.sum(-1).clamp(min=1e-12)  # (heads, steps)
        for head in range(heads):
            mask = kept_mask(kept[cache_head_of(head, heads, cache_heads)], rows.shape[-1])
            share = rows[head][:, mask].sum(-1) / on_prompt[head]
            rest = rows[head][:, sink_size:]
            share_after_sink = rest[:, mask[sink_size:]].sum(-1) / rest.sum(-1).clamp(min=1e-12)
            records.append({"layer": layer, "head": head, "kept_share": float(share.mean()),
                            "kept_share_after_sink": float(share_after_sink.mean()), "kept": int(mask.sum()),
                            "prompt_len": rows.shape[-1]})
    return pd.DataFrame(records)


def generation_rows_or_none(trace: Trace, layer: int, row: int):
    if not trace.metadata.get("generation") or trace.generated == 0:
        return None
    return generation_rows(trace, layer, row)


def _check_head(trace: Trace, head: int) -> None:
    heads = trace.metadata["num_attention_heads"]
    if check_int("head", head, 0) >= heads:
        raise ValueError(f"head must be an int from 0 to {heads - 1}, got {head}")


# -- figures ---------------------------------------------------------------------------------------
def default_layer(trace: Trace) -> int:
    """A middle recorded layer."""
    layers = trace.layers
    return layers[len(layers) // 2]


def default_budget(trace: Trace, row: int = 0) -> int:
    """A budget that keeps about a quarter of the prompt (at least the window + 16)."""
    n = int(trace.prompt_lengths[row])
    return max(trace.metadata["window_size"] + 16, int(math.ceil(n / 4)))
