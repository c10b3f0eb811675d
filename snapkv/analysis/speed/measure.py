"""Decode speed and memory of SnapKV against the full cache, by prompt length and batch size.

One measurement (`decode_speed`) prefills a prompt under `snapkv.compress(model, policy)` (in chunks of
`prefill_chunk_size` tokens when given), takes one decoding step (SnapKV selects and gathers the kept
positions there), then times `decode_tokens` greedy steps of a manual loop
`model(next_token, cache=cache)`, synchronising the device around each step. It reports

  decode_ms_per_token  median wall time of the timed steps (p10/p90 alongside)
  kv_cache_mib         keys + values bytes over `cache.layers` after decoding (exact, any device)
  weights_mib          parameters + buffers of the model
  memory_mib           weights + KV cache: what decoding holds resident (activations aside)
  peak_memory_mib      torch.cuda.max_memory_allocated over prefill and decoding (CUDA only, else None)

`speed_memory_table` runs it over prompt lengths x batch sizes x methods. Speed and memory do not depend
on the text, so every row of a batch is the same prompt, and the prompt's first `n - tail` tokens are
prefilled once per length (full cache, batch 1) and copied for every configuration, which then prefills
its own last `tail` tokens (at least the observation window) under its method. `memory_extrapolation`
carries the measured bytes per cache slot to longer prompts, for the "where does the full cache stop
fitting" question. Rows follow `benchmarks/speed_memory.py`'s schema, plus `batch_size` and `status`.
"""

import inspect
import math
import statistics
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

MIB = 2**20
GIB = 2**30
ROW_FIELDS = ("method", "budget", "batch_size", "prompt_len", "prefill_s", "first_step_s", "decode_ms_per_token",
              "kv_cache_mib", "peak_rss_mib", "chunked", "status")
PROMPT_MODULES = ("argparse", "collections", "typing", "inspect", "dataclasses", "pathlib", "functools", "enum",
                  "logging", "subprocess", "textwrap", "configparser", "email.message", "ast", "tarfile",
                  "zipfile", "difflib", "pydoc")


# -- small pieces --------------------------------------------------------------------------------------
def kv_cache_bytes(cache) -> int:
    """Bytes of every key and value tensor held in `cache.layers` (compressed layers included)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def kv_slots(cache, layer: int = 0) -> int:
    """Slots (positions) held by one cache layer."""
    keys = getattr(cache.layers[layer], "keys", None)
    return int(keys.shape[-2]) if isinstance(keys, torch.Tensor) else 0


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """(1, length) token ids of real text: standard library source, module after module."""
    from snapkv.analysis.text import module_source

    text = ""
    for name in PROMPT_MODULES:
        text += f"# ---- {name} ----\n{module_source(name)}\n"
        if len(text) < 3 * length:  # source code runs at 3.5-4 characters per token
            continue
        for cut in (text[: 5 * length], text):  # tokenize a little more than needed, everything if short
            ids = tokenizer(cut, return_tensors="pt", add_special_tokens=False).input_ids
            if ids.shape[-1] >= length:
                return ids[:, :length]
    raise ValueError(f"the modules in PROMPT_MODULES give fewer than {length} tokens: ask for a shorter prompt")


def _cache_argument(model) -> str:
    # transformers 5.x names the argument `cache` in newer releases (and deprecates `past_key_values`)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward(model, ids: torch.Tensor, cache, **kwargs):
    """One forward of `ids` (batch, q) appended to `cache`."""
    return model(input_ids=ids, use_cache=True, **{_cache_argument(model): cache}, **kwargs)


def chunk_bounds(start: int, stop: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """[start, stop) cut into chunks of `chunk_size` (one chunk when None). A last chunk of a single token
    would be taken for a decoding step, so it borrows a token from the chunk before it."""
    if stop <= start:
        return []
    size = chunk_size or stop - start
    bounds = [(begin, min(begin + size, stop)) for begin in range(start, stop, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        (a, b), (_, d) = bounds[-2], bounds[-1]
        bounds[-2:] = [(a, b - 1), (b - 1, d)]
    return bounds


def prefill(model, ids: torch.Tensor, cache, *, start: int = 0, chunk_size: int | None = None) -> torch.Tensor:
    """Forward ids[:, start:] onto `cache` (in chunks when chunk_size is given); the last position's logits."""
    logits = None
    for begin, end in chunk_bounds(start, ids.shape[-1], chunk_size):
        logits = forward(model, ids[:, begin:end], cache, logits_to_keep=1).logits
    if logits is None:
        raise ValueError(f"nothing to prefill: the cache already holds {start} of {ids.shape[-1]} tokens")
    return logits[:, -1:]


def copy_cache(model, cache, batch_size: int = 1):
    """A new DynamicCache holding `cache`'s keys and values, each row repeated `batch_size` times."""
    from transformers import DynamicCache

    copy = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if batch_size > 1:
            keys, values = keys.repeat_interleave(batch_size, 0), values.repeat_interleave(batch_size, 0)
        copy.update(keys.clone(), values.clone(), index)
    return copy


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    _synchronize(device)
    return time.perf_counter()


def method_name(policy) -> tuple[str, int | None]:
    """("FullCache", None) or ("SnapKV", budget) etc. for a snapkv policy."""
    budget = getattr(policy, "max_capacity_prompt", None)
    return type(policy).__name__, budget if isinstance(budget, int) else None


# -- one measurement -----------------------------------------------------------------------------------
def decode_speed(model, input_ids: torch.Tensor, policy, *, decode_tokens: int = 32,
                 prefill_chunk_size: int | None = None, cache=None) -> dict:
    """Prefill `input_ids` (batch, n) under `policy`, then time `decode_tokens` greedy decoding steps.

    cache: a cache already holding the first tokens of every row (e.g. `copy_cache` of a shared prefix);
        only the rest is prefilled here, under the policy (keep at least the observation window for it).
        None starts from an empty DynamicCache.
    Returns one row (see the module docstring); timings synchronise the device (CUDA) around every step.
    """
    from transformers import DynamicCache

    import snapkv

    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 1:
        raise ValueError(f"decode_tokens must be a positive int, got {decode_tokens!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    cache = DynamicCache(config=model.config) if cache is None else cache
    start = cache.get_seq_length()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = []
    with torch.inference_mode(), snapkv.compress(model, policy, prefill_chunk_size=prefill_chunk_size):
        began = _clock(device)
        logits = prefill(model, input_ids, cache, start=start, chunk_size=prefill_chunk_size)
        prefill_s = _clock(device) - began
        token = logits[:, -1:].argmax(-1)
        began = _clock(device)
        logits = forward(model, token, cache).logits
        first_step_s = _clock(device) - began
        for _ in range(decode_tokens):
            token = logits[:, -1:].argmax(-1)
            began = _clock(device)
            logits = forward(model, token, cache).logits
            steps.append(1000 * (_clock(device) - began))
    method, budget = method_name(policy)
    batch, n = input_ids.shape
    kv_bytes = kv_cache_bytes(cache)
    slots = kv_slots(cache)
    weights = model_bytes(model)
    parameter = next(model.parameters())
    ordered = sorted(steps)
    return {
        "method": method,
        "budget": budget,
        "batch_size": batch,
        "prompt_len": n,
        "prefill_s": prefill_s,
        "prefilled_tokens": n - start,
        "first_step_s": first_step_s,
        "decode_ms_per_token": statistics.median(steps),
        "decode_ms_p10": ordered[int(0.1 * len(ordered))],
        "decode_ms_p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "decode_tokens": len(steps),
        "kv_cache_mib": kv_bytes / MIB,
        "kv_slots_layer0": slots,
        "kv_bytes_per_slot": kv_bytes / (batch * slots) if slots else None,
        "weights_mib": weights / MIB,
        "memory_mib": (weights + kv_bytes) / MIB,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None,
        "peak_rss_mib": None,
        "chunked": prefill_chunk_size is not None,
        "device": str(device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "status": "ok",
        "error": None,
    }


# -- a grid of measurements ----------------------------------------------------------------------------
def speed_memory_table(model, tokenizer, *, prompt_lengths=(1024, 2048, 4096), budgets=(256, 512, 1024),
                       batch_sizes=(1, 2, 4), decode_tokens: int = 32, window_size: int = 32, kernel_size: int = 7,
                       pooling: str = "maxpool", gqa: str = "mean", tail: int | None = None,
                       progress: bool = True) -> pd.DataFrame:
    """Full cache vs SnapKV at every budget below the prompt length, for every prompt length and batch size.

    Each length's prompt (standard library source) minus its last `tail` tokens (default: window_size) is
    prefilled once at batch 1 without compression, then copied (rows repeated) for every configuration,
    which prefills its own last `tail` tokens under its method before decoding. One row per configuration
    (`decode_speed`), plus `prefix_prefill_s` (the shared part's time, batch 1).
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
        _warm_up(model, tokenizer, device)
        bar = tqdm(total=len(plan), desc="speed/memory", unit="config", disable=not progress)
        for n in sorted(prompt_lengths):
            ids = prompt_ids(tokenizer, n).to(device)
            prefix = _new_cache(model)
            began = _clock(device)
            prefill(model, ids[:, : n - tail], prefix)
            prefix_s = _clock(device) - began
            for batch, policy in [(b, p) for m, b, p in plan if m == n]:
                bar.set_postfix_str(f"n={n} batch={batch} {policy.__class__.__name__} {method_name(policy)[1] or ''}")
                row = decode_speed(model, ids.expand(batch, -1), policy, decode_tokens=decode_tokens,
                                   cache=copy_cache(model, prefix, batch))
                rows.append(row | {"prefix_prefill_s": prefix_s, "shared_prefix_len": n - tail})
                bar.update()
            del prefix
        bar.close()
    return pd.DataFrame(rows)


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _warm_up(model, tokenizer, device) -> None:
    """One short prefill and step outside any timing (thread pools, allocator, lazy initialisation)."""
    ids = prompt_ids(tokenizer, 64).to(device)
    cache = _new_cache(model)
    logits = prefill(model, ids, cache)
    forward(model, logits.argmax(-1), cache)


# -- memory beyond what was measured -------------------------------------------------------------------
def configuration_label(method: str, budget) -> str:
    return method if budget is None or (isinstance(budget, float) and math.isnan(budget)) else f"{method} {int(budget)}"


def memory_extrapolation(table: pd.DataFrame, prompt_lengths) -> pd.DataFrame:
    """Weights + KV cache predicted at `prompt_lengths` for every (method, budget, batch_size) measured.

    From each configuration's measured bytes per cache slot (kv_cache_mib / (batch x slots)): a cache holds
    min(n, budget) prompt slots (n for the full cache) plus the decoded tokens it held when measured.
    Returns one row per configuration and length: kv_cache_gib, memory_gib (weights included).
    """
    measured = table[table["status"] == "ok"]
    rows = []
    for (method, budget, batch), group in measured.groupby(["method", "budget", "batch_size"], dropna=False):
        per_slot = float((group["kv_cache_mib"] * MIB / (group["batch_size"] * group["kv_slots_layer0"])).mean())
        kept = group["prompt_len"] if pd.isna(budget) else np.minimum(group["prompt_len"], budget)
        decoded = float((group["kv_slots_layer0"] - kept).mean())
        weights = float(group["weights_mib"].mean()) * MIB
        for n in prompt_lengths:
            slots = (n if pd.isna(budget) else min(n, budget)) + decoded
            kv = batch * per_slot * slots
            rows.append({"method": method, "budget": None if pd.isna(budget) else int(budget), "batch_size": batch,
                         "prompt_len": n, "config": configuration_label(method, budget),
                         "kv_bytes_per_slot": per_slot, "kv_cache_gib": kv / GIB, "memory_gib": (weights + kv) / GIB})
    return pd.DataFrame(rows)


def longest_prompt_within(table: pd.DataFrame, memory_limit_gib: float, method: str = "FullCache") -> pd.DataFrame:
    """Per batch size, the longest prompt whose weights + KV cache stay within `memory_limit_gib` for
    `method` (from measured bytes per slot, as `memory_extrapolation`); None if even an empty cache does not fit."""
    rows = []
    measured = table[(table["status"] == "ok") & (table["method"] == method)]
    for batch, group in measured.groupby("batch_size"):
        per_slot = float((group["kv_cache_mib"] * MIB / (group["batch_size"] * group["kv_slots_layer0"])).mean())
        decoded = float((group["kv_slots_layer0"] - group["prompt_len"]).mean())
        free = memory_limit_gib * GIB - float(group["weights_mib"].mean()) * MIB
        longest = math.floor(free / (batch * per_slot) - decoded) if free > 0 else None
        rows.append({"method": method, "batch_size": batch, "memory_limit_gib": memory_limit_gib,
                     "longest_prompt": longest if longest is None or longest > 0 else None})
    return pd.DataFrame(rows)
