"""snapkv: compress a transformers model's prompt KV cache the SnapKV way, and record what every
attention head looks at during prefill and generation."""

from snapkv.analysis.record import record
from snapkv.core import H2O, FullCache, RandomEviction, SnapKV, StreamingLLM, compress, select_positions
from snapkv.core.loading import load_model

__version__ = "0.1.0"
__all__ = [
    "H2O", "FullCache", "RandomEviction", "SnapKV", "StreamingLLM", "compress", "load_model", "record",
    "select_positions",
]
