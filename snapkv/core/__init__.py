"""The compression engine: selection math, policies, the attention hook, model loading."""

from snapkv.core.compress import CompressionSession, compress
from snapkv.core.policies import H2O, FullCache, Policy, RandomEviction, SnapKV, StreamingLLM
from snapkv.core.selection import observation_attention, select_positions

__all__ = [
    "H2O", "CompressionSession", "FullCache", "Policy", "RandomEviction", "SnapKV", "StreamingLLM",
    "compress", "observation_attention", "select_positions",
]
