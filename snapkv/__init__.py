"""snapkv: compress a transformers model's prompt KV cache the SnapKV way, and record what every
attention head looks at during prefill and generation."""

from snapkv.core import (
    H2O,
    AdaKV,
    BoundaryProtection,
    ChunkKV,
    ExpectedAttention,
    FullCache,
    KNorm,
    KVPack,
    KVzip,
    Policy,
    PrefillView,
    PyramidKV,
    RandomEviction,
    ScoredPolicy,
    SnapKV,
    SpanKeeping,
    StreamingLLM,
    Trace,
    compress,
    load_model,
    method_names,
    method_policy,
    pack,
    record,
    record_teacher_forced,
    register_method,
    select_positions,
)

__version__ = "0.1.0"
__all__ = [
    "H2O", "AdaKV", "BoundaryProtection", "ChunkKV", "ExpectedAttention", "FullCache", "KNorm", "SpanKeeping",
    "KVPack", "KVzip", "Policy", "PrefillView", "PyramidKV", "RandomEviction",
    "ScoredPolicy", "SnapKV", "StreamingLLM", "Trace", "calibrate", "compress", "load_model", "method_names",
    "method_policy", "pack", "record", "record_teacher_forced", "register_method", "select_positions",
]


def __getattr__(name: str):
    """`snapkv.calibrate` is imported on first use: it lives in `snapkv.analysis.quality.calibration` (pandas)."""
    if name == "calibrate":
        from snapkv.analysis.quality.calibration import calibrate

        return calibrate
    raise AttributeError(f"module 'snapkv' has no attribute {name!r}")
