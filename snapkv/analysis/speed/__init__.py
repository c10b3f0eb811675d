"""Speed and memory: decode ms/token, KV-cache bytes and prefill cost of a policy against the full cache
(measure), and their figure (plots)."""

from snapkv.analysis.speed.measure import (
    GIB,
    MIB,
    PROMPT_MODULES,
    ROW_FIELDS,
    chunk_bounds,
    configuration_label,
    copy_cache,
    decode_speed,
    forward,
    kv_cache_bytes,
    kv_slots,
    longest_prompt_within,
    memory_extrapolation,
    method_name,
    model_bytes,
    prefill,
    prompt_ids,
    speed_memory_table,
)
from snapkv.analysis.speed.plots import (
    speed_memory_figure,
)

__all__ = [
    "MIB", "GIB", "ROW_FIELDS", "PROMPT_MODULES", "kv_cache_bytes", "kv_slots", "model_bytes", "prompt_ids",
    "forward", "chunk_bounds", "prefill", "copy_cache", "method_name", "decode_speed", "speed_memory_table",
    "configuration_label", "memory_extrapolation", "longest_prompt_within", "speed_memory_figure",
]
