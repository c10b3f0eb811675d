"""snapkv: compress a transformers model's prompt KV cache the SnapKV way, and record what every
attention head looks at during prefill and generation."""

from snapkv.core import (
    H2O,
    FullCache,
    Policy,
    RandomEviction,
    SnapKV,
    StreamingLLM,
    Trace,
    compress,
    load_model,
    record,
    record_teacher_forced,
    select_positions,
)

__version__ = "0.1.0"
__all__ = [
    "H2O", "FullCache", "Policy", "RandomEviction", "SnapKV", "StreamingLLM", "Trace", "compress", "load_model",
    "record", "record_teacher_forced", "select_positions",
]
