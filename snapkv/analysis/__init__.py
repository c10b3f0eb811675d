"""Analysis: attention recording (`record`, `record_teacher_forced`) and traces on disk (`Trace`)."""

from snapkv.analysis.record import Recorder, estimate_trace_bytes, record, record_teacher_forced
from snapkv.analysis.trace import Trace

__all__ = ["Recorder", "Trace", "estimate_trace_bytes", "record", "record_teacher_forced"]
