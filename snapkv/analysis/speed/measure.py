"""Decode speed and memory of SnapKV against the full cache, by prompt length and batch size.

One measurement (`decode_speed`) prefills a prompt under `snapkv.compress(model, policy)` (in chunks of
`prefill_chunk_size` tokens when given), takes one decoding step (SnapKV selects and gathers the kept
positions there), then times `decode_tokens` greedy steps of a manual loop
`model(next_token, cache=cache)`, synchronising the device around each step. It reports

  decode_ms_per_token  median wall time of the timed steps (p10/p90 alongside)
  kv_cache_mib         keys + values bytes over `cache.layers` after decoding (exact, any device)
  kv_slots_layer0      slots held by layer 0 (a sliding-window layer on Gemma 3: see the next two)
  kv_slots_global      slots held by the first full-attention layer (the layers SnapKV compresses)
  kv_slots_sliding     slots held by the first sliding-window layer (at most its window; None without any)
  kv_bytes_per_slot    kv_cache_mib / (batch x mean slots per layer): bytes of one position in every layer
  layers               how many cache layers
  sliding_layers       how many layers are sliding-window layers (never compressed)
  sliding_window       their window (None without any): a sliding layer never holds more than that
  compressed_layers    how many layers the policy compressed (selected kept positions for; a budget covering
                       the prompt keeps them all), compressed_layer_ids which ("5,11,17"); None for a press
  weights_mib          parameters + buffers of the model
  memory_mib           weights + KV cache: what decoding holds resident (activations aside)
  peak_memory_mib      torch.cuda.max_memory_allocated over prefill and decoding (CUDA only, else None)
  *_cpu_*              the process's CPU time over the same spans as the wall times
  generated_head       the first 8 greedy tokens of the first row (a check that methods agree)

The policy is a snapkv policy or a kvpress press; `record_window` adds `snapkv.record` on top.

This module needs torch alone (no pandas, no plotting), so that a benchmark worker that imports it measures
the model's memory, not the analysis libraries'. `snapkv.analysis.speed.tables` runs it over a grid.
"""

import contextlib
import dataclasses
import statistics
import time

import torch

from snapkv.analysis.text import stdlib_source_ids
from snapkv.core.cache import RaggedLayer
from snapkv.core.compat import forward, new_cache, prefill
from snapkv.core.policies import SnapKV, check_int

MIB = 2**20
GIB = 2**30
ROW_FIELDS = ("method", "budget", "batch_size", "prompt_len", "prefill_s", "first_step_s", "decode_ms_per_token",
              "kv_cache_mib", "peak_rss_mib", "chunked", "status")
WARM_UP_TOKENS = 64
# SnapKV's settings but its budget: its dataclass defaults (the paper's LongBench setting), what the speed
# benchmarks (benchmarks/speed_memory.py, gpu_scale.py) run and record
SNAPKV_SETTINGS = {field.name: field.default for field in dataclasses.fields(SnapKV)
                   if field.name != "max_capacity_prompt"}


# -- small pieces --------------------------------------------------------------------------------------
def kv_cache_bytes(cache) -> int:
    """Bytes of every key and value tensor held in `cache.layers` (compressed layers included)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "prompt_keys", "prompt_values"):  # prompt_*: a RaggedLayer's kept slots
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def kv_slots(cache, layer: int = 0) -> float:
    """Slots (positions) held by one cache layer, per head (a RaggedLayer's heads differ: their mean)."""
    if isinstance(cache.layers[layer], RaggedLayer):
        return cache.layers[layer].mean_slots()
    keys = getattr(cache.layers[layer], "keys", None)
    return int(keys.shape[-2]) if isinstance(keys, torch.Tensor) else 0


def kv_slots_by_kind(cache) -> dict:
    """Slots held by the first full-attention layer and the first sliding-window layer (None when the cache has
    none of that kind), the number of layers, of sliding-window layers and their window: {"kv_slots_global",
    "kv_slots_sliding", "layers", "sliding_layers", "sliding_window"}."""
    sliding = [bool(getattr(layer, "is_sliding", False)) for layer in cache.layers]
    first = {kind: next((i for i, s in enumerate(sliding) if s == kind), None) for kind in (False, True)}
    return {"kv_slots_global": None if first[False] is None else kv_slots(cache, first[False]),
            "kv_slots_sliding": None if first[True] is None else kv_slots(cache, first[True]),
            "layers": len(sliding), "sliding_layers": sum(sliding),
            "sliding_window": None if first[True] is None
            else getattr(cache.layers[first[True]], "sliding_window", None)}


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """(1, length) token ids of real text: standard library source, module after module
    (`snapkv.analysis.text.stdlib_source_ids`)."""
    return torch.tensor([stdlib_source_ids(tokenizer, length)])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds now, once the device has finished its queued work."""
    _synchronize(device)
    return time.perf_counter(), time.process_time()


def _since(device: torch.device, start: tuple[float, float]) -> tuple[float, float]:
    """(wall, process CPU) seconds since `start` (a `_clock` reading)."""
    wall, cpu = _clock(device)
    return wall - start[0], cpu - start[1]


def method_name(policy) -> tuple[str, int | None]:
    """("FullCache", None) or ("SnapKV", budget) etc. for a snapkv policy."""
    budget = getattr(policy, "max_capacity_prompt", None)
    return type(policy).__name__, budget if isinstance(budget, int) else None


# -- one measurement -----------------------------------------------------------------------------------
def decode_speed(model, input_ids: torch.Tensor, policy, *, decode_tokens: int = 32,
                 prefill_chunk_size: int | None = None, cache=None, record_window: int | None = None) -> dict:
    """Prefill `input_ids` (batch, n) under `policy`, then time `decode_tokens` greedy decoding steps.

    policy: a snapkv policy (run under `snapkv.compress`), or a kvpress press (run as `policy(model)`).
    cache: a cache already holding the first tokens of every row (e.g. `copy_cache` of `shared_prefix`);
        only the rest is prefilled here, under the policy (keep at least the observation window for it).
        None starts from an empty DynamicCache.
    record_window: also run under `snapkv.record(model, window_size=record_window)`, for what recording costs.
    Returns one row (see the module docstring); timings synchronise the device (CUDA) around every step, and
    the *_cpu_* columns are the process's CPU time over the same spans.
    """
    import snapkv

    check_int("decode_tokens", decode_tokens, 1)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if not isinstance(policy, snapkv.Policy) and not callable(policy):
        raise TypeError(f"policy must be a snapkv policy (SnapKV(), FullCache(), ...) or a kvpress press, "
                        f"got {type(policy).__name__}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    cache = new_cache(model) if cache is None else cache
    start = cache.get_seq_length()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens, steps, cpu_steps = [], [], []
    with (torch.inference_mode(),
          _applied(model, policy, prefill_chunk_size, record_window, decode_tokens + 2) as session):
        began = _clock(device)
        logits = prefill(model, input_ids, cache, start=start, chunk_size=prefill_chunk_size)
        prefill_s, prefill_cpu_s = _since(device, began)
        tokens.append(logits[:, -1:].argmax(-1))
        began = _clock(device)
        logits = forward(model, tokens[-1], cache).logits
        first_step_s, first_step_cpu_s = _since(device, began)
        for _ in range(decode_tokens):
            tokens.append(logits[:, -1:].argmax(-1))
            began = _clock(device)
            logits = forward(model, tokens[-1], cache).logits
            wall, cpu = _since(device, began)
            steps.append(1000 * wall)
            cpu_steps.append(1000 * cpu)
    method, budget = method_name(policy)
    batch, n = input_ids.shape
    kv_bytes = kv_cache_bytes(cache)
    slots = kv_slots(cache)
    mean_slots = sum(kv_slots(cache, layer) for layer in range(len(cache.layers))) / max(len(cache.layers), 1)
    compressed = sorted(session.kept_positions) if session is not None else None
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
        "prefill_cpu_s": prefill_cpu_s,
        "first_step_cpu_s": first_step_cpu_s,
        "decode_cpu_ms_per_token": statistics.median(cpu_steps),
        "kv_cache_mib": kv_bytes / MIB,
        "kv_slots_layer0": slots,
        **kv_slots_by_kind(cache),
        "kv_bytes_per_slot": kv_bytes / (batch * mean_slots) if mean_slots else None,
        "compressed_layers": None if compressed is None else len(compressed),
        "compressed_layer_ids": None if compressed is None else ",".join(map(str, compressed)),
        "weights_mib": weights / MIB,
        "memory_mib": (weights + kv_bytes) / MIB,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None,
        "peak_rss_mib": None,
        "chunked": prefill_chunk_size is not None,
        "record_window": record_window,
        "generated_head": torch.cat(tokens[:8], dim=-1)[0].tolist(),
        "device": str(device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "status": "ok",
        "error": None,
    }


@contextlib.contextmanager
def _applied(model, policy, prefill_chunk_size: int | None, record_window: int | None, new_tokens: int):
    """The block runs under `policy` (snapkv.compress, or a kvpress press's own context) and, with a
    record_window, under snapkv.record for `new_tokens` generated tokens; yields the compression session
    (None for a press)."""
    import snapkv

    if isinstance(policy, snapkv.Policy):
        method = snapkv.compress(model, policy, prefill_chunk_size=prefill_chunk_size)
    else:
        method = policy(model)
    recording = (snapkv.record(model, window_size=record_window, max_new_tokens=new_tokens)
                 if record_window is not None else contextlib.nullcontext())
    with method as session, recording:
        yield session if isinstance(policy, snapkv.Policy) else None


def shared_prefix(model, ids: torch.Tensor, length: int, *, prefill_chunk_size: int | None = None):
    """A full cache of ids[:, :length] (prefilled in chunks of `prefill_chunk_size` when given), for every
    configuration of one prompt to continue its own copy of (`copy_cache`), and what it cost:
    (cache, {"shared_prefix_len", "prefix_prefill_s", "prefix_prefill_cpu_s"})."""
    device = next(model.parameters()).device
    cache = new_cache(model)
    with torch.inference_mode():
        began = _clock(device)
        prefill(model, ids[:, :length].to(device), cache, chunk_size=prefill_chunk_size)
        wall, cpu = _since(device, began)
    return cache, {"shared_prefix_len": length, "prefix_prefill_s": wall, "prefix_prefill_cpu_s": cpu}


def warm_up(model, ids: torch.Tensor) -> None:
    """One short prefill of `ids` (batch, n) and one step under snapkv.compress(FullCache), outside any
    timing (thread pools, allocator, lazy initialisation)."""
    import snapkv

    device = next(model.parameters()).device
    cache = new_cache(model)
    with torch.inference_mode(), snapkv.compress(model, snapkv.FullCache()):
        logits = prefill(model, ids.to(device), cache)
        forward(model, logits.argmax(-1), cache)
