"""Named methods (a policy at a budget) and the grid of them an experiment runs."""

from dataclasses import dataclass

from snapkv import H2O, FullCache, Policy, RandomEviction, SnapKV, StreamingLLM

DEFAULT_BUDGETS = (128, 256, 512, 1024)
ABLATION_BUDGETS = (128,)
WINDOW_SIZE, KERNEL_SIZE = 16, 5  # the paper's needle-in-a-haystack setting (maxpool)
METHODS = ("full", "snapkv", "streaming", "random", "h2o", "snapkv-avgpool", "snapkv-nopool")
ABLATION_METHODS = ("snapkv-avgpool", "snapkv-nopool")  # run at the ablation budgets only
DEFAULT_METHODS = METHODS


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
    """The policy for a method name: full, snapkv (maxpool), snapkv-avgpool, snapkv-nopool, streaming (4 sink
    tokens), random (seed 0) or h2o; every windowed policy keeps the last `window_size` positions."""
    if name == "full":
        return FullCache()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    if name.startswith("snapkv"):
        pooling = {"snapkv": "maxpool", "snapkv-avgpool": "avgpool", "snapkv-nopool": "none"}[name]
        return SnapKV(window_size=window_size, max_capacity_prompt=budget, kernel_size=kernel_size, pooling=pooling,
                      gqa="mean")
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
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise ValueError(f"budgets must be ints, got {budget!r}")
        if budget <= window_size:
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


