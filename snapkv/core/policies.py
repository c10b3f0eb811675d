"""Eviction policies: frozen configs that turn what prefill saw into kept positions per cache head.

Every policy answers two questions: how many prompt positions layer `layer` keeps (`budget`), and
which (`select`). `select` gets a `PrefillView` and returns long (batch, cache_heads, budget) input
positions, ascending; the compression session gathers keys/values with it.
"""

from dataclasses import dataclass

import torch

from snapkv.core.selection import (
    GQA_MODES,
    POOLINGS,
    accumulated_attention,
    select_per_row,
    select_positions,
    streaming_positions,
    top_positions,
)


@dataclass(frozen=True)
class PrefillView:
    """What a layer saw during prefill, for one prompt.

    query_window (batch, heads, <= window, head_dim): the last prompt queries; keys
    (batch, kv_heads, n, head_dim); padding_mask (batch, n) bool, None if every token is real; accumulated
    (batch, heads, n) attention received by each key (only for policies that ask for it).
    """

    query_window: torch.Tensor
    keys: torch.Tensor
    padding_mask: torch.Tensor | None
    scaling: float
    accumulated: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def row(self, row: int, real: torch.Tensor) -> "PrefillView":
        """One row, cut down to its real positions `real`."""
        accumulated = None if self.accumulated is None else self.accumulated[row : row + 1, :, real]
        return PrefillView(self.query_window[row : row + 1], self.keys[row : row + 1, :, real], None,
                           self.scaling, accumulated)


def check_int(name: str, value, minimum: int) -> int:
    """`value` itself when it is an int (not a bool) of at least `minimum`; else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_budget(max_capacity_prompt, window_size: int):
    """An int, or a tuple/list of ints (one per layer); each must exceed the window."""
    budgets = max_capacity_prompt if isinstance(max_capacity_prompt, (list, tuple)) else [max_capacity_prompt]
    if not budgets:
        raise ValueError("max_capacity_prompt is an empty list: give one budget per layer")
    for budget in budgets:
        check_int("max_capacity_prompt", budget, 1)
        if budget <= window_size:
            raise ValueError(
                f"max_capacity_prompt ({budget}) must exceed window_size ({window_size}): "
                "the budget includes the observation window"
            )


class Policy:
    """Shared behaviour. Subclasses are frozen dataclasses."""

    window_size: int = 0  # last prompt queries a policy needs to see
    needs_accumulated_attention: bool = False

    def budget(self, layer: int) -> int | None:
        """Prompt positions layer `layer` keeps; None keeps everything."""
        budget = getattr(self, "max_capacity_prompt", None)
        return budget[layer] if isinstance(budget, tuple) else budget

    def cache_heads(self, heads: int, kv_heads: int) -> int:
        return kv_heads

    def check_model(self, num_layers: int) -> None:
        budget = getattr(self, "max_capacity_prompt", None)
        if isinstance(budget, tuple) and len(budget) != num_layers:
            raise ValueError(
                f"max_capacity_prompt lists {len(budget)} budgets but the model has {num_layers} layers: "
                "give one budget per layer, or a single int"
            )

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        """Kept positions (batch, cache_heads, budget), ascending, for a prompt longer than `budget`
        with no padding."""
        raise NotImplementedError

    def kept_positions(self, view: PrefillView, budget: int) -> torch.Tensor:
        """Kept input positions (batch, cache_heads, min(n, budget)), ascending; padded batches are
        selected row by row on real tokens, and slots a short row leaves empty are -1."""
        if view.padding_mask is None:
            if view.length <= budget:
                heads = self.cache_heads(view.query_window.shape[1], view.keys.shape[1])
                return torch.arange(view.length, device=view.keys.device).expand(view.keys.shape[0], heads, -1)
            return self.select(view, budget)
        return select_per_row(
            lambda row, real: self.kept_positions(view.row(row, real), budget)[0], view.padding_mask, budget
        )


@dataclass(frozen=True)
class FullCache(Policy):
    """Keep everything: the reference every other policy is compared with."""

    def budget(self, layer: int) -> None:
        return None


@dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV (Algorithm 1). max_capacity_prompt includes the window; a tuple gives one budget per layer."""

    window_size: int = 32
    max_capacity_prompt: int | tuple[int, ...] = 1024
    kernel_size: int = 7
    pooling: str = "maxpool"
    gqa: str = "mean"

    def __post_init__(self):
        check_int("window_size", self.window_size, 1)
        if isinstance(self.max_capacity_prompt, list):
            object.__setattr__(self, "max_capacity_prompt", tuple(self.max_capacity_prompt))
        _check_budget(self.max_capacity_prompt, self.window_size)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so pooling keeps positions aligned, got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {GQA_MODES}, got {self.gqa!r}")

    def cache_heads(self, heads: int, kv_heads: int) -> int:
        return heads if self.gqa == "expand" else kv_heads

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        return select_positions(
            view.query_window, view.keys, window_size=self.window_size, max_capacity_prompt=budget,
            kernel_size=self.kernel_size, pooling=self.pooling, gqa=self.gqa, scaling=view.scaling,
        )


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """The first `sink_size` tokens (attention sinks) and the most recent ones."""

    sink_size: int = 4
    max_capacity_prompt: int = 1024

    def __post_init__(self):
        check_int("sink_size", self.sink_size, 0)
        _check_budget(self.max_capacity_prompt, self.sink_size)

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        b, kv_heads, n, _ = view.keys.shape
        return streaming_positions(n, budget, self.sink_size).to(view.keys.device).expand(b, kv_heads, budget)


@dataclass(frozen=True)
class RandomEviction(Policy):
    """Uniformly random prefix positions per head, plus the last `window_size`. Reproducible with `seed`."""

    max_capacity_prompt: int = 1024
    window_size: int = 32
    seed: int = 0

    def __post_init__(self):
        check_int("window_size", self.window_size, 0)
        _check_budget(self.max_capacity_prompt, self.window_size)
        check_int("seed", self.seed, 0)

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        b, kv_heads, n, _ = view.keys.shape
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(b, kv_heads, n - self.window_size, generator=generator).to(view.keys.device)
        return top_positions(scores, budget - self.window_size, self.window_size)


@dataclass(frozen=True)
class H2O(Policy):
    """Heavy hitters: prefix positions with the most attention summed over ALL prompt queries
    (computed block by block during prefill), plus the last `window_size` positions."""

    max_capacity_prompt: int = 1024
    window_size: int = 32
    needs_accumulated_attention = True

    def __post_init__(self):
        check_int("window_size", self.window_size, 0)
        _check_budget(self.max_capacity_prompt, self.window_size)

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        kv_heads = view.keys.shape[1]
        b, heads, n = view.accumulated.shape
        scores = view.accumulated.reshape(b, kv_heads, heads // kv_heads, n).mean(dim=2)
        return top_positions(scores[..., : n - self.window_size], budget - self.window_size, self.window_size)


def accumulate(previous: torch.Tensor | None, queries, keys, scaling, padding_mask) -> torch.Tensor:
    """Add one prefill call's accumulated attention (queries are the last rows of `keys`)."""
    new = accumulated_attention(queries, keys, scaling=scaling, padding_mask=padding_mask)
    if previous is not None:
        new[..., : previous.shape[-1]] += previous
    return new
