"""Speed and memory: decode ms/token, KV-cache bytes and prefill cost of a policy against the full cache
(measure, torch only), over a grid of prompt lengths and batch sizes (tables), and their figure (plots).

`tables` and `plots` load on first use, so a benchmark worker that imports `measure` holds no pandas or plotting
library in the memory it measures."""

import importlib

from snapkv.analysis.speed.measure import (
    GIB,
    MIB,
    ROW_FIELDS,
    WARM_UP_TOKENS,
    decode_speed,
    kv_cache_bytes,
    kv_slots,
    kv_slots_by_kind,
    method_name,
    model_bytes,
    prompt_ids,
    shared_prefix,
    warm_up,
)

_LAZY = {
    "tables": ('SpeedSettings', 'speed_memory_table', 'configuration_label', 'memory_extrapolation',
               'longest_prompt_within'),
    "plots": ('speed_memory_figure',),
}

__all__ = [
    "MIB", "GIB", "ROW_FIELDS", "WARM_UP_TOKENS", "kv_cache_bytes", "kv_slots", "kv_slots_by_kind",
    "model_bytes", "prompt_ids", "method_name", "decode_speed", "shared_prefix", "warm_up", "SpeedSettings",
    "speed_memory_table",
    "configuration_label", "memory_extrapolation", "longest_prompt_within", "speed_memory_figure",
]


def __getattr__(name: str):
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"snapkv.analysis.speed.{module}"), name)
    raise AttributeError(f"module 'snapkv.analysis.speed' has no attribute {name!r}")
