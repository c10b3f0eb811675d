"""Named methods: one registry read by the experiments (`snapkv needle`, `snapkv tasks`, notebooks 06/07),
the explorer, calibration and the engine's contract tests, so a new method joins all of them with one entry.

    snapkv.register_method(name, build)      build(budget=..., window_size=..., kernel_size=...) -> a Policy,
                                             or a ScoredPolicy subclass (built with max_capacity_prompt=budget
                                             and window_size)
    snapkv.method_names()                    every registered name, in registration order
    snapkv.method_policy(name, budget, window_size=..., kernel_size=...)   the policy of a name at a budget

An experiment builds each method at each of its budgets with its own observation window and pooling kernel;
"full" ignores the budget. Built in: full, snapkv (maxpool), snapkv-avgpool, snapkv-nopool, adakv, pyramidkv,
chunkkv (SnapKV's window, kernel and maxpool; their own defaults otherwise), streaming (4 sink tokens), random
(seed 0) and h2o.
"""

from collections.abc import Callable

from snapkv.core.policies import (
    H2O,
    AdaKV,
    ChunkKV,
    FullCache,
    Policy,
    PyramidKV,
    RandomEviction,
    ScoredPolicy,
    SnapKV,
    StreamingLLM,
)

# the window and kernel an experiment uses unless told otherwise: the paper's needle-in-a-haystack setting
WINDOW_SIZE, KERNEL_SIZE = 16, 5

_METHODS: dict[str, Callable[..., Policy]] = {}


def register_method(name: str, build) -> None:
    """Register (or replace) the method `name`: `build` is a function of keywords `budget`, `window_size`
    and `kernel_size` returning a Policy, or a ScoredPolicy subclass (built with max_capacity_prompt=budget
    and window_size=window_size)."""
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


def method_policy(name: str, budget: int | None, *, window_size: int = WINDOW_SIZE,
                  kernel_size: int = KERNEL_SIZE) -> Policy:
    """The policy of the registered method `name` at `budget` (window included; None for "full")."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(_METHODS)}, or add it with "
                         "snapkv.register_method")
    policy = _METHODS[name](budget=budget, window_size=window_size, kernel_size=kernel_size)
    if not isinstance(policy, Policy):
        raise TypeError(f"the method {name!r} built a {type(policy).__name__}, not a snapkv Policy")
    return policy


def _snapkv(kind=SnapKV, **changes):
    """A build of `kind` at the experiment's window and kernel; its other fields: SnapKV's defaults, or `changes`."""
    def build(budget, window_size, kernel_size):
        return kind(window_size=window_size, max_capacity_prompt=budget, kernel_size=kernel_size, **changes)

    return build


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
