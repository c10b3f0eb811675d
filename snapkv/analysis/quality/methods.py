"""Named methods (a policy at a budget), the grid of them an experiment runs, and the defaults (with their
quick-mode overrides) of the needle grid and the task suite, which `snapkv needle` / `snapkv tasks` and
notebooks 06 / 07 all read."""

from dataclasses import dataclass
from typing import ClassVar

from snapkv import H2O, AdaKV, ChunkKV, FullCache, Policy, PyramidKV, RandomEviction, SnapKV, StreamingLLM
from snapkv.analysis.quality.prompts import DEFAULT_DEPTHS, DEFAULT_LENGTHS, TASKS
from snapkv.core.policies import check_int

DEFAULT_BUDGETS = (128, 256, 512, 1024)
ABLATION_BUDGETS = (128,)
WINDOW_SIZE, KERNEL_SIZE = 16, 5  # the paper's needle-in-a-haystack setting (maxpool)
METHODS = ("full", "snapkv", "adakv", "pyramidkv", "chunkkv", "streaming", "random", "h2o", "snapkv-avgpool",
           "snapkv-nopool")
SUCCESSORS = {"adakv": AdaKV, "pyramidkv": PyramidKV, "chunkkv": ChunkKV}  # SnapKV's arguments, their own defaults
CALIBRATED = "snapkv-calibrated"  # `snapkv.calibrate`'s SnapKV at each budget
SNAPKV_FAMILY = ("snapkv", CALIBRATED, *SUCCESSORS)  # SnapKV and its successors
CALIBRATION_THRESHOLD = 0.5  # full-cache score a (task, length) group needs to be kept
ABLATION_METHODS = ("snapkv-avgpool", "snapkv-nopool")  # run at the ablation budgets only
DEFAULT_METHODS = METHODS
MODES = ("question-aware", "question-agnostic")  # compress with the question in the window, or before it
POOLING = {"snapkv": "maxpool", "snapkv-avgpool": "avgpool", "snapkv-nopool": "none"}  # SnapKV variant: its pooling


@dataclass(frozen=True)
class Method:
    """A named policy at a budget (None for the full cache)."""

    name: str
    budget: int | None
    policy: Policy

    @property
    def key(self) -> tuple[str, int | None]:
        return self.name, self.budget


def method_policy(name: str, budget: int | None, *, window_size: int = WINDOW_SIZE,
                  kernel_size: int = KERNEL_SIZE) -> Policy:
    """The policy for a method name: full, snapkv (maxpool), snapkv-avgpool, snapkv-nopool, adakv, pyramidkv,
    chunkkv (SnapKV's window, kernel and maxpool; their own defaults otherwise), streaming (4 sink tokens),
    random (seed 0) or h2o; every windowed policy keeps the last `window_size` positions."""
    if name == "full":
        return FullCache()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    if name.startswith("snapkv"):
        return SnapKV(window_size=window_size, max_capacity_prompt=budget, kernel_size=kernel_size,
                      pooling=POOLING[name], gqa="mean")
    if name in SUCCESSORS:
        return SUCCESSORS[name](window_size=window_size, max_capacity_prompt=budget, kernel_size=kernel_size,
                                pooling="maxpool", gqa="mean")
    if name == "streaming":
        return StreamingLLM(sink_size=4, max_capacity_prompt=budget)
    if name == "random":
        return RandomEviction(max_capacity_prompt=budget, window_size=window_size, seed=0)
    return H2O(max_capacity_prompt=budget, window_size=window_size)


def check_methods(methods, budgets, ablation_budgets=ABLATION_BUDGETS, *, window_size: int = WINDOW_SIZE) -> None:
    """Raise ValueError for an unknown method or a budget the windowed policies cannot honour."""
    methods = list(methods)
    if not methods:
        raise ValueError(f"methods is empty: choose from {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}: choose from {', '.join(METHODS)}")
    for budget in [*budgets, *ablation_budgets]:
        if check_int("budget", budget, 1) <= window_size:
            raise ValueError(f"budget {budget} must exceed the observation window ({window_size} tokens): "
                             "the budget includes the window")
    if any(m != "full" and m not in ABLATION_METHODS for m in methods) and not list(budgets):
        raise ValueError("budgets is empty: give at least one budget for the compressing methods")


def method_grid(methods=DEFAULT_METHODS, budgets=DEFAULT_BUDGETS, ablation_budgets=ABLATION_BUDGETS, *,
                window_size: int = WINDOW_SIZE, kernel_size: int = KERNEL_SIZE) -> list[Method]:
    """Every (method, budget) to run: the full cache once, the pooling variants at `ablation_budgets`,
    the other methods at every budget."""
    check_methods(methods, budgets, ablation_budgets, window_size=window_size)
    grid = []
    for name in methods:
        chosen = [None] if name == "full" else ablation_budgets if name in ABLATION_METHODS else budgets
        for budget in sorted(set(chosen), key=lambda b: -1 if b is None else b):
            grid.append(Method(name, budget, method_policy(name, budget, window_size=window_size,
                                                           kernel_size=kernel_size)))
    return grid


def check_lengths_fit(lengths, model, max_new_tokens: int = 40) -> None:
    """Raise ValueError when a prompt length plus the answer exceeds the model's context."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is None:
        return
    too_long = [n for n in lengths if n + max_new_tokens > limit]
    if too_long:
        raise ValueError(f"length(s) {too_long} plus {max_new_tokens} answer tokens exceed the model's context "
                         f"({limit} positions): use lengths <= {limit - max_new_tokens}")


QUICK_METHODS = ("full", "snapkv", *SUCCESSORS)  # quick runs: a tiny smoke run of one short length
QUICK_BUDGETS = (128,)
QUICK_LENGTHS = (512,)


@dataclass(frozen=True)
class NeedleSettings:
    """The needle-in-a-haystack grid (`snapkv needle`, notebook 06); QUICK: what a quick run changes."""

    lengths: tuple[int, ...] = DEFAULT_LENGTHS  # prompt tokens
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    methods: tuple[str, ...] = METHODS
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    ablation_budgets: tuple[int, ...] = ABLATION_BUDGETS  # of the pooling ablation (ABLATION_METHODS)
    samples: int = 1  # needles per length, each at every depth
    modes: tuple[str, ...] = ("question-aware",)
    haystack: str | None = None  # a text file; None: standard-library docstrings
    needle_format: str = "number"
    seed: int = 0
    window_size: int = WINDOW_SIZE
    kernel_size: int = KERNEL_SIZE
    calibrated: bool = True  # also "snapkv-calibrated": `snapkv.calibrate`'s SnapKV at every budget (cached per model)
    QUICK: ClassVar[dict] = dict(lengths=QUICK_LENGTHS, depths=(0.0, 0.5, 1.0), budgets=QUICK_BUDGETS,
                                 methods=(*QUICK_METHODS, *ABLATION_METHODS), ablation_budgets=QUICK_BUDGETS,
                                 calibrated=False)


@dataclass(frozen=True)
class TaskSettings:
    """The RULER-style task suite (`snapkv tasks`, notebook 07); QUICK: what a quick run changes."""

    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (1000, 2000, 4000)
    samples: int = 5  # prompts per task and length
    methods: tuple[str, ...] = ("full", "snapkv", "adakv", "pyramidkv", "chunkkv", "streaming", "random", "h2o")
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    ablation_budgets: tuple[int, ...] = ABLATION_BUDGETS  # used only when methods include ABLATION_METHODS
    modes: tuple[str, ...] = MODES
    threshold: float = CALIBRATION_THRESHOLD  # full-cache score a (task, length) group needs to be kept
    calibration_samples: int = 3
    haystack: str | None = None
    seed: int = 0
    window_size: int = WINDOW_SIZE
    kernel_size: int = KERNEL_SIZE
    calibrated: bool = True  # also "snapkv-calibrated" (see NeedleSettings)
    QUICK: ClassVar[dict] = dict(tasks=("single_key",), lengths=QUICK_LENGTHS, samples=1, methods=QUICK_METHODS,
                                 budgets=QUICK_BUDGETS, calibration_samples=1, calibrated=False)
