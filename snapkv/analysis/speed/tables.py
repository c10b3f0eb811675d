"""Speed and memory over a grid: `speed_memory_table` runs `decode_speed` over prompt lengths x batch sizes x
methods. Speed and memory do not depend on the text, so every row of a batch is the same prompt, and the prompt's
first `n - tail` tokens are prefilled once per length (full cache, batch 1) and copied for every configuration,
which then prefills its own last `tail` tokens (at least the observation window) under its method.
`memory_extrapolation` carries the measured bytes per cache slot to longer prompts, for the "where does the full
cache stop fitting" question. Rows follow `benchmarks/speed_memory.py`'s schema, plus `batch_size` and `status`.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from snapkv.analysis.speed.measure import (
    GIB,
    MIB,
    WARM_UP_TOKENS,
    decode_speed,
    method_name,
    prompt_ids,
    shared_prefix,
    warm_up,
)
from snapkv.core.compat import copy_cache
from snapkv.core.policies import SnapKV


@dataclass(frozen=True)
class SpeedSettings:
    """Notebook 08's grid (paper scale: prompts to the embedded model's 8K context); DEFAULT and QUICK: what the
    default and quick profiles change (`snapkv.analysis.reporting.setup`). threads: torch CPU threads (None:
    torch's own)."""

    prompt_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    budgets: tuple[int, ...] = (256, 512, 1024, 2048)
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    decode_tokens: int = 32
    threads: int | None = None
    DEFAULT: ClassVar[dict] = dict(prompt_lengths=(1024, 2048, 4096), budgets=(256, 1024), batch_sizes=(1, 2),
                                   decode_tokens=16)
    QUICK: ClassVar[dict] = dict(prompt_lengths=(256, 512), budgets=(64, 128), batch_sizes=(1, 2, 4), decode_tokens=6,
                                 threads=1)


def speed_memory_table(model, tokenizer, *, prompt_lengths=(1024, 2048, 4096), budgets=(256, 512, 1024),
                       batch_sizes=(1, 2, 4), decode_tokens: int = 32, window_size: int = SnapKV.window_size,
                       kernel_size: int = SnapKV.kernel_size, pooling: str = SnapKV.pooling, gqa: str = SnapKV.gqa,
                       tail: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Full cache vs SnapKV at every budget below the prompt length, for every prompt length and batch size.

    Each length's prompt (standard library source) minus its last `tail` tokens (default: window_size) is
    prefilled once at batch 1 without compression, then copied (rows repeated) for every configuration,
    which prefills its own last `tail` tokens under its method before decoding. One row per configuration
    (`decode_speed`), plus `shared_prefix` cost columns (the shared part's length and time, batch 1).
    """
    import snapkv

    tail = window_size if tail is None else tail
    if tail < window_size:
        raise ValueError(f"tail ({tail}) must be at least window_size ({window_size}): SnapKV votes with the "
                         "queries of the last window_size tokens, which it must see being prefilled")
    bad = [n for n in prompt_lengths if n <= tail]
    if bad:
        raise ValueError(f"prompt_lengths {bad} must exceed tail ({tail})")
    policies = [snapkv.FullCache()] + [
        snapkv.SnapKV(window_size=window_size, max_capacity_prompt=b, kernel_size=kernel_size, pooling=pooling,
                      gqa=gqa) for b in sorted(budgets)]
    plan = [(n, b, p) for n in sorted(prompt_lengths) for b in sorted(batch_sizes)
            for p in policies if method_name(p)[1] is None or method_name(p)[1] < n]
    device = next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        warm_up(model, prompt_ids(tokenizer, WARM_UP_TOKENS))
        bar = tqdm(total=len(plan), desc="speed/memory", unit="config", disable=not progress)
        for n in sorted(prompt_lengths):
            ids = prompt_ids(tokenizer, n).to(device)
            prefix, prefix_cost = shared_prefix(model, ids, n - tail)
            for batch, policy in [(b, p) for m, b, p in plan if m == n]:
                bar.set_postfix_str(f"n={n} batch={batch} {policy.__class__.__name__} {method_name(policy)[1] or ''}")
                row = decode_speed(model, ids.expand(batch, -1), policy, decode_tokens=decode_tokens,
                                   cache=copy_cache(prefix, batch))
                rows.append(row | prefix_cost)
                bar.update()
            del prefix
        bar.close()
    return pd.DataFrame(rows)


# -- memory beyond what was measured -------------------------------------------------------------------
def configuration_label(method: str, budget) -> str:
    return method if budget is None or (isinstance(budget, float) and math.isnan(budget)) else f"{method} {int(budget)}"


def _slot_model(group: pd.DataFrame, budget) -> dict:
    """What one configuration's measured rows say about its cache: bytes of one position in every layer, the
    decoded slots it held beyond the prompt, its layer counts and the most a sliding-window layer holds."""
    layers = float(group["layers"].iloc[0])
    sliding = float(group["sliding_layers"].fillna(0).iloc[0])
    kept = group["prompt_len"] if pd.isna(budget) else np.minimum(group["prompt_len"], budget)
    global_slots = group["kv_slots_global"].where(group["kv_slots_global"].notna(), group["kv_slots_layer0"])
    decoded = float((global_slots - kept).mean())
    # a sliding layer holds min(prompt + decoded, its capacity): the capacity is what it held when it was full
    # (fewer slots than the prompt and decoded tokens), else at most its window
    full = group[group["kv_slots_sliding"] < group["prompt_len"] + decoded] if sliding else group.iloc[:0]
    capacity = float(full["kv_slots_sliding"].max()) if len(full) else float(group["sliding_window"].max()) \
        if sliding and group["sliding_window"].notna().any() else math.inf
    return {"per_slot": float(group["kv_bytes_per_slot"].mean()), "decoded": decoded, "layers": layers,
            "sliding": sliding, "capacity": capacity, "weights": float(group["weights_mib"].mean()) * MIB}


def _mean_slots(model: dict, prompt_slots: float, n: float) -> float:
    """Mean slots per layer: global layers hold `prompt_slots` + decoded, sliding layers at most their capacity."""
    held = prompt_slots + model["decoded"]
    sliding = min(n + model["decoded"], model["capacity"])
    return ((model["layers"] - model["sliding"]) * held + model["sliding"] * sliding) / model["layers"]


def memory_extrapolation(table: pd.DataFrame, prompt_lengths) -> pd.DataFrame:
    """Weights + KV cache predicted at `prompt_lengths` for every (method, budget, batch_size) measured.

    From each configuration's measured bytes per position in every layer (kv_bytes_per_slot): a full-attention
    layer holds min(n, budget) prompt slots (n for the full cache) plus the decoded tokens it held when
    measured; a sliding-window layer (Gemma 3's) holds at most its window, whatever the method.
    Returns one row per configuration and length: kv_cache_gib, memory_gib (weights included).
    """
    measured = table[table["status"] == "ok"]
    rows = []
    for (method, budget, batch), group in measured.groupby(["method", "budget", "batch_size"], dropna=False):
        model = _slot_model(group, budget)
        for n in prompt_lengths:
            kv = batch * model["per_slot"] * _mean_slots(model, n if pd.isna(budget) else min(n, budget), n)
            rows.append({"method": method, "budget": None if pd.isna(budget) else int(budget), "batch_size": batch,
                         "prompt_len": n, "config": configuration_label(method, budget),
                         "kv_bytes_per_slot": model["per_slot"], "kv_cache_gib": kv / GIB,
                         "memory_gib": (model["weights"] + kv) / GIB})
    return pd.DataFrame(rows)


def longest_prompt_within(table: pd.DataFrame, memory_limit_gib: float, method: str = "FullCache") -> pd.DataFrame:
    """Per batch size, the longest prompt whose weights + KV cache stay within `memory_limit_gib` for
    `method` (the full cache's growth as `memory_extrapolation` models it); None if even an empty cache does not
    fit."""
    rows = []
    measured = table[(table["status"] == "ok") & (table["method"] == method)]
    for batch, group in measured.groupby("batch_size"):
        model = _slot_model(group, float("nan"))
        free = memory_limit_gib * GIB - model["weights"]
        mean_slots = free / (batch * model["per_slot"])  # what fits, as mean slots per layer
        if mean_slots > model["capacity"]:  # sliding layers are full: only the global layers grow
            global_layers = model["layers"] - model["sliding"]
            held = (mean_slots * model["layers"] - model["sliding"] * model["capacity"]) / global_layers \
                if global_layers else math.inf
        else:
            held = mean_slots
        longest = None if free <= 0 else held if math.isinf(held) else math.floor(held - model["decoded"])
        rows.append({"method": method, "batch_size": batch, "memory_limit_gib": memory_limit_gib,
                     "longest_prompt": longest if longest is None or longest > 0 else None})
    return pd.DataFrame(rows)
