"""Analysis: one subpackage per experiment family, each with functions that return tidy DataFrames, readings
computed from them and one plot function per figure.

observation/  does the observation window predict what generation attends to (notebooks 01-05)
quality/      what compression costs in answers: needle grid and task suite (06, 07)
speed/        what it saves in time and memory (08, benchmarks/)
explorer/     one head of a saved trace at a time (09)
reporting/    results saved with their settings, the notebook runner, `snapkv reproduce` and its index page
text.py       the one place that builds text and prompt sets from the standard library

The observation functions are importable from here: `from snapkv.analysis import hit_rate_along_generation`.
"""

import importlib

_OBSERVATION = ("hit_rate_along_generation", "hit_rate_table", "voted_overlap", "voted_set", "windows_along_prompt")
__all__ = list(_OBSERVATION)


def __getattr__(name: str):
    """The observation functions, imported on first use: `import snapkv.analysis.text` (the speed benchmark's
    workers do) must not load the plotting libraries, which would count in their peak memory."""
    if name in _OBSERVATION:
        return getattr(importlib.import_module("snapkv.analysis.observation"), name)
    raise AttributeError(f"module 'snapkv.analysis' has no attribute {name!r}")
