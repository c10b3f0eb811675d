"""The engine: everything that touches a model.

hook (the one attention function and the Tap base) -> selection (pure math: which positions a head keeps)
-> policies (SnapKV and baselines as frozen configs; `ScoredPolicy`: a policy that is a score; with units, the
token units SpanKeeping keeps whole, and queries, a layer's queries rebuilt for ExpectedAttention) -> registry (named
methods) -> cache (the compressed cache layer) -> compress
(`snapkv.compress`) and record (`snapkv.record`, saved as a `Trace`); pack (`snapkv.pack`: a context's cache to ask
many questions of, saved as a `KVPack`); loading (`snapkv.load_model`) and compat
(every call that depends on the transformers version); environment (where a number came from; the weights
fingerprint) and files (`atomic_path`: every file and folder the toolkit writes, written atomically).
"""

from snapkv.core.compat import copy_cache
from snapkv.core.compress import CompressionSession, attach, compress
from snapkv.core.hook import AttentionCall, Tap
from snapkv.core.kvzip import KVzip
from snapkv.core.loading import load_model
from snapkv.core.pack import KVPack, pack
from snapkv.core.policies import (
    H2O,
    AdaKV,
    BoundaryProtection,
    ChunkKV,
    ExpectedAttention,
    FullCache,
    KNorm,
    Policy,
    PrefillView,
    PyramidKV,
    RandomEviction,
    ScoredPolicy,
    SnapKV,
    SpanKeeping,
    StreamingLLM,
    check_int,
)
from snapkv.core.record import Recorder, estimate_trace_bytes, record, record_teacher_forced
from snapkv.core.registry import method_names, method_policy, needs_tokenizer, register_method
from snapkv.core.selection import observation_attention, select_positions
from snapkv.core.trace import Trace

__all__ = [
    "H2O", "AdaKV", "AttentionCall", "BoundaryProtection", "ChunkKV", "ExpectedAttention", "KNorm", "KVzip",
    "SpanKeeping",
    "PyramidKV", "CompressionSession", "FullCache", "KVPack", "pack",
    "Policy", "PrefillView", "RandomEviction", "Recorder", "ScoredPolicy", "SnapKV", "StreamingLLM", "Tap", "Trace",
    "attach", "check_int", "compress", "copy_cache", "estimate_trace_bytes", "load_model", "method_names",
    "method_policy", "needs_tokenizer", "observation_attention", "record", "record_teacher_forced", "register_method",
    "select_positions",
]
