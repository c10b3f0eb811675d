"""Named methods (a policy at a budget, from the engine's registry: `snapkv.register_method`), the grid of them
an experiment runs, and the defaults (with their quick-mode overrides) of the needle grid and the task suite,
which `snapkv needle` / `snapkv tasks` and notebooks 06 / 07 all read. Any registered method may be named in a
grid."""

from dataclasses import dataclass
from typing import ClassVar

from snapkv import Policy, method_names, method_policy
from snapkv.analysis.quality.prompts import DEFAULT_DEPTHS, DEFAULT_LENGTHS, TASKS
from snapkv.core.policies import check_int
from snapkv.core.registry import KERNEL_SIZE, WINDOW_SIZE, needs_tokenizer

DEFAULT_BUDGETS = (128, 256, 512, 1024)
ABLATION_BUDGETS = (128,)
# the question-aware comparison (the full profile's grid): SnapKV, its variants and successors, the baselines and the
# question-agnostic scores; every registered method may be named (`method_names()`; the +span/+boundary wrappers and
# the question-agnostic setting are notebook 14's)
METHODS = ("full", "snapkv", "adakv", "pyramidkv", "chunkkv", "streaming", "random", "h2o", "snapkv-avgpool",
           "snapkv-nopool", "knorm", "expected-attention", "kvzip")
SUCCESSORS = ("adakv", "pyramidkv", "chunkkv")  # SnapKV's arguments, their own defaults
CALIBRATED = "snapkv-calibrated"  # `snapkv.calibrate`'s SnapKV at each budget
SNAPKV_FAMILY = ("snapkv", CALIBRATED, *SUCCESSORS)  # SnapKV and its successors
CALIBRATION_THRESHOLD = 0.5  # full-cache score a (task, length) group needs to be kept
ABLATION_METHODS = ("snapkv-avgpool", "snapkv-nopool")  # run at the ablation budgets only
DEFAULT_METHODS = METHODS
MODES = ("question-aware", "question-agnostic")  # compress with the question in the window, or before it
POOLING = {name: method_policy(name, DEFAULT_BUDGETS[-1]).pooling  # SnapKV variant: its pooling
           for name in ("snapkv", *ABLATION_METHODS)}


@dataclass(frozen=True)
class Method:
    """A named policy at a budget (None for the full cache)."""

    name: str
    budget: int | None
    policy: Policy

    @property
    def key(self) -> tuple[str, int | None]:
        return self.name, self.budget


def check_methods(methods, budgets, ablation_budgets=ABLATION_BUDGETS, *, window_size: int = WINDOW_SIZE) -> None:
    """Raise ValueError for an unknown method or a budget the windowed policies cannot honour."""
    methods, known = list(methods), method_names()
    if not methods:
        raise ValueError(f"methods is empty: choose from {', '.join(known)}")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}: choose from {', '.join(known)}, or "
                         "add one with snapkv.register_method")
    for budget in [*budgets, *ablation_budgets]:
        if check_int("budget", budget, 1) <= window_size:
            raise ValueError(f"budget {budget} must exceed the observation window ({window_size} tokens): "
                             "the budget includes the window")
    if any(m != "full" and m not in ABLATION_METHODS for m in methods) and not list(budgets):
        raise ValueError("budgets is empty: give at least one budget for the compressing methods")


def method_grid(methods=DEFAULT_METHODS, budgets=DEFAULT_BUDGETS, ablation_budgets=ABLATION_BUDGETS, *,
                window_size: int = WINDOW_SIZE, kernel_size: int = KERNEL_SIZE, tokenizer=None) -> list[Method]:
    """Every (method, budget) to run: the full cache once, the pooling variants at `ablation_budgets`,
    the other methods at every budget. tokenizer: for the methods that need one (`registry.needs_tokenizer`:
    KVzip's repeat prompt, SpanKeeping's units); without it they raise before anything runs."""
    check_methods(methods, budgets, ablation_budgets, window_size=window_size)
    missing = [name for name in methods if tokenizer is None and needs_tokenizer(name)]
    if missing:
        raise ValueError(f"{', '.join(missing)} need(s) the tokenizer: pass method_grid(..., tokenizer=tokenizer)")
    grid = []
    for name in methods:
        chosen = [None] if name == "full" else ablation_budgets if name in ABLATION_METHODS else budgets
        for budget in sorted(set(chosen), key=lambda b: -1 if b is None else b):
            grid.append(Method(name, budget, method_policy(name, budget, window_size=window_size,
                                                           kernel_size=kernel_size, tokenizer=tokenizer)))
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
# the default profile: the methods that carry a finding, at two budgets, on the lengths the smallest model answers
FINDING_METHODS = ("full", "snapkv", "adakv", "pyramidkv", "chunkkv", "streaming", "h2o")
DEFAULT_PROFILE_BUDGETS = (128, 512)
DEFAULT_PROFILE_LENGTHS = (1000, 2000)
QUICK_BUDGETS = (128,)
QUICK_LENGTHS = (512,)


@dataclass(frozen=True)
class NeedleSettings:
    """The needle-in-a-haystack grid (`snapkv needle`, notebook 06): paper scale; DEFAULT and QUICK: what the
    default and quick profiles change (`snapkv.analysis.reporting.setup`)."""

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
    DEFAULT: ClassVar[dict] = dict(lengths=DEFAULT_PROFILE_LENGTHS, depths=(0.0, 0.25, 0.5, 0.75, 1.0), samples=1,
                                   methods=FINDING_METHODS, budgets=DEFAULT_PROFILE_BUDGETS)
    QUICK: ClassVar[dict] = dict(lengths=QUICK_LENGTHS, depths=(0.0, 0.5, 1.0), budgets=QUICK_BUDGETS,
                                 methods=(*QUICK_METHODS, *ABLATION_METHODS), ablation_budgets=QUICK_BUDGETS,
                                 calibrated=False)


@dataclass(frozen=True)
class TaskSettings:
    """The RULER-style task suite (`snapkv tasks`, notebook 07): paper scale; DEFAULT and QUICK: what the default
    and quick profiles change. The default keeps the two retrieval tasks the embedded models' full cache solves
    (the others are dropped by the calibration step in a full run)."""

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
    DEFAULT: ClassVar[dict] = dict(tasks=("single_key", "multi_key"), lengths=DEFAULT_PROFILE_LENGTHS, samples=2,
                                   methods=FINDING_METHODS, budgets=DEFAULT_PROFILE_BUDGETS, calibration_samples=2,
                                   modes=("question-aware",))  # question-agnostic: notebook 14's leaderboard
    QUICK: ClassVar[dict] = dict(tasks=("single_key",), lengths=QUICK_LENGTHS, samples=1, methods=QUICK_METHODS,
                                 budgets=QUICK_BUDGETS, calibration_samples=1, calibrated=False)
