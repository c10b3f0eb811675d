"""Named methods: one registry read by the experiments (`snapkv needle`, `snapkv tasks`, notebooks 06/07),
the explorer, calibration and the engine's contract tests, so a new method joins all of them with one entry.

    snapkv.register_method(name, build)      build(budget=..., window_size=..., kernel_size=...) -> a Policy,
                                             or a ScoredPolicy subclass (built with max_capacity_prompt=budget
                                             and window_size); a build with a `tokenizer` parameter gets the
                                             tokenizer too, and needs one unless the parameter has a default
    snapkv.method_names()                    every registered name, in registration order
    snapkv.method_policy(name, budget, window_size=..., kernel_size=..., tokenizer=None)   the policy of a name
                                             at a budget (the tokenizer goes to the builds that take one)
    needs_tokenizer(name)                    whether `method_policy(name, ...)` needs the tokenizer
    with_span(name), with_boundary(name)     the build of a registered method inside SpanKeeping (word units;
                                             it needs the tokenizer) or BoundaryProtection (share 0.2)

An experiment builds each method at each of its budgets with its own observation window and pooling kernel;
"full" ignores the budget. Built in: full, snapkv (maxpool), snapkv-avgpool, snapkv-nopool, adakv, pyramidkv,
chunkkv (SnapKV's window, kernel and maxpool; their own defaults otherwise), streaming (4 sink tokens), random
(seed 0), h2o, knorm and expected-attention (kvpress's defaults, with the experiment's window), and for X in
snapkv, knorm and expected-attention: X+span (needs the tokenizer) and X+boundary; kvzip, kvzip+span and
kvzip+boundary (kvpress's repeat prompt, chunks and sinks, with the experiment's window; they need the tokenizer,
which tokenizes the repeat prompt).
"""

import functools
import inspect
from collections.abc import Callable

from snapkv.core.kvzip import KVzip
from snapkv.core.policies import (
    H2O,
    AdaKV,
    BoundaryProtection,
    ChunkKV,
    ExpectedAttention,
    FullCache,
    KNorm,
    Policy,
    PyramidKV,
    RandomEviction,
    ScoredPolicy,
    SnapKV,
    SpanKeeping,
    StreamingLLM,
)

# the window and kernel an experiment uses unless told otherwise: the paper's needle-in-a-haystack setting
WINDOW_SIZE, KERNEL_SIZE = 16, 5

_METHODS: dict[str, Callable[..., Policy]] = {}


def register_method(name: str, build) -> None:
    """Register (or replace) the method `name`: `build` is a function of keywords `budget`, `window_size`
    and `kernel_size` (and `tokenizer`, when it has that parameter: the method then needs the tokenizer unless
    the parameter has a default) returning a Policy, or a ScoredPolicy subclass (built with
    max_capacity_prompt=budget and window_size=window_size)."""
    if not isinstance(name, str) or not name or "," in name:
        raise ValueError(f"a method name must be a non-empty string without commas, got {name!r}")
    if isinstance(build, type) and issubclass(build, ScoredPolicy):
        cls = build

        def build(budget, window_size, kernel_size):
            return cls(max_capacity_prompt=budget, window_size=window_size)

    if not callable(build):
        raise TypeError(f"build must be a ScoredPolicy subclass or a function (budget, window_size, kernel_size) "
                        f"-> Policy, got {type(build).__name__}")
    _METHODS[name] = build


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(_METHODS)


def _tokenizer_parameter(build) -> inspect.Parameter | None:
    """The `tokenizer` parameter of a build, None when it has none."""
    try:
        return inspect.signature(build).parameters.get("tokenizer")
    except (TypeError, ValueError):  # a callable whose signature Python cannot read takes no tokenizer
        return None


def _check_name(name: str) -> None:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(_METHODS)}, or add it with "
                         "snapkv.register_method")


def needs_tokenizer(name: str) -> bool:
    """Whether the registered method `name` needs the tokenizer (`method_policy(..., tokenizer=...)`): its
    policy reads token text, as SpanKeeping's units do."""
    _check_name(name)
    parameter = _tokenizer_parameter(_METHODS[name])
    return parameter is not None and parameter.default is inspect.Parameter.empty


def method_policy(name: str, budget: int | None, *, window_size: int = WINDOW_SIZE,
                  kernel_size: int = KERNEL_SIZE, tokenizer=None) -> Policy:
    """The policy of the registered method `name` at `budget` (window included; None for "full").

    tokenizer: the model's tokenizer, for the methods that need one (`needs_tokenizer`); the others ignore it.
    """
    _check_name(name)
    keywords = dict(budget=budget, window_size=window_size, kernel_size=kernel_size)
    if tokenizer is not None and _tokenizer_parameter(_METHODS[name]) is not None:
        keywords["tokenizer"] = tokenizer
    elif tokenizer is None and needs_tokenizer(name):
        raise ValueError(f"the method {name!r} reads token text and needs the model's tokenizer: call "
                         f"method_policy({name!r}, budget, tokenizer=tokenizer)")
    policy = _METHODS[name](**keywords)
    if not isinstance(policy, Policy):
        raise TypeError(f"the method {name!r} built a {type(policy).__name__}, not a snapkv Policy")
    return policy


def _snapkv(kind=SnapKV, **changes):
    """A build of `kind` at the experiment's window and kernel; its other fields: SnapKV's defaults, or `changes`."""
    def build(budget, window_size, kernel_size):
        return kind(window_size=window_size, max_capacity_prompt=budget, kernel_size=kernel_size, **changes)

    return build


def with_span(name: str, unit: str = "word"):
    """A build of the registered method `name` inside SpanKeeping, units `unit`: a kept token brings its whole
    unit. It needs the tokenizer. Register it with `register_method(f"{name}+span", with_span(name))`."""
    _check_name(name)

    def build(budget, window_size, kernel_size, tokenizer):
        policy = method_policy(name, budget, window_size=window_size, kernel_size=kernel_size, tokenizer=tokenizer)
        return SpanKeeping(policy, tokenizer=tokenizer, unit=unit)

    return build


def with_boundary(name: str, share: float = BoundaryProtection.share):
    """A build of the registered method `name` inside BoundaryProtection (`share` of the budget for the prompt's
    first and last tokens); it needs the tokenizer when `name` does. Register it with
    `register_method(f"{name}+boundary", with_boundary(name))`."""
    _check_name(name)

    def build(budget, window_size, kernel_size, tokenizer):
        policy = method_policy(name, budget, window_size=window_size, kernel_size=kernel_size, tokenizer=tokenizer)
        return BoundaryProtection(policy, share=share)

    return build if needs_tokenizer(name) else functools.partial(build, tokenizer=None)  # None: an optional tokenizer


register_method("full", lambda budget, window_size, kernel_size: FullCache())
register_method("snapkv", _snapkv())
register_method("adakv", _snapkv(AdaKV))
register_method("pyramidkv", _snapkv(PyramidKV))
register_method("chunkkv", _snapkv(ChunkKV))
register_method("streaming", lambda budget, window_size, kernel_size: StreamingLLM(sink_size=4,
                                                                                    max_capacity_prompt=budget))
register_method("random", lambda budget, window_size, kernel_size: RandomEviction(max_capacity_prompt=budget,
                                                                                   window_size=window_size, seed=0))
register_method("h2o", H2O)
register_method("snapkv-avgpool", _snapkv(pooling="avgpool"))
register_method("snapkv-nopool", _snapkv(pooling="none"))
register_method("knorm", KNorm)
register_method("expected-attention", ExpectedAttention)
register_method("snapkv+span", with_span("snapkv"))
register_method("knorm+span", with_span("knorm"))
register_method("expected-attention+span", with_span("expected-attention"))
register_method("snapkv+boundary", with_boundary("snapkv"))
register_method("knorm+boundary", with_boundary("knorm"))
register_method("expected-attention+boundary", with_boundary("expected-attention"))
register_method("kvzip", lambda budget, window_size, kernel_size, tokenizer: KVzip.for_tokenizer(
    tokenizer, max_capacity_prompt=budget, window_size=window_size))
register_method("kvzip+span", with_span("kvzip"))
register_method("kvzip+boundary", with_boundary("kvzip"))
