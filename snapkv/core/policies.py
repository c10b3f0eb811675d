"""Eviction policies: frozen configs that turn what prefill saw into kept positions per cache head.

Every policy answers two questions: how many prompt positions layer `layer` keeps (`budget`), and
which (`select`). `select` gets a `PrefillView` and returns long (batch, cache_heads, budget) input
positions, ascending; the compression session gathers keys/values with it.

Most policies are a score: a `ScoredPolicy` subclass defines `score(view) -> (batch, cache_heads, n)`
(higher = keep) and the base keeps the last `window_size` positions plus the highest-scoring others, with
per-layer budgets, left padding and GQA handled once:

    @dataclass(frozen=True)
    class SmallKeys(snapkv.ScoredPolicy):
        def score(self, view):
            return -view.keys.float().norm(dim=-1)

A policy declares in `observes` what prefill must record for it beyond the keys and values ("query_window",
"accumulated_attention", "hidden_states"); nothing else is computed.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from snapkv.core.selection import (
    GQA_MODES,
    POOLINGS,
    accumulated_attention,
    adaptive_positions,
    chunk_positions,
    pyramid_budgets,
    select_per_row,
    snapkv_scores,
    streaming_positions,
    top_positions,
    window_votes,
)

OBSERVATIONS = ("query_window", "accumulated_attention", "hidden_states")


@dataclass(frozen=True)
class PrefillView:
    """What a layer saw during prefill, for one prompt (what the policy does not observe is None).

    keys, values (batch, kv_heads, n, head_dim), post-RoPE; padding_mask (batch, n) bool, None if every token is
    real; scaling: the layer's softmax scale; query_window (batch, heads, <= window, head_dim): the last prompt
    queries ("query_window"); accumulated (batch, heads, n): attention received by each key from every prompt
    query ("accumulated_attention"); hidden_states (batch, n, hidden): the attention module's input
    ("hidden_states"); module: the attention module (its projections, `config`, `layer_idx`).
    """

    keys: torch.Tensor
    padding_mask: torch.Tensor | None
    scaling: float
    query_window: torch.Tensor | None = None
    accumulated: torch.Tensor | None = None
    values: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    module: torch.nn.Module | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    @property
    def query_heads(self) -> int:
        """Query heads of the layer (the kv heads when neither the queries nor the module are known)."""
        if self.query_window is not None:
            return self.query_window.shape[1]
        config = getattr(self.module, "config", None)
        return config.num_attention_heads if config is not None else self.keys.shape[1]

    def row(self, row: int, real: torch.Tensor) -> "PrefillView":
        """One row, cut down to its real positions `real`."""

        def cut(tensor, dim):
            return None if tensor is None else tensor[row : row + 1].index_select(dim, real)

        query_window = None if self.query_window is None else self.query_window[row : row + 1]
        return PrefillView(keys=cut(self.keys, 2), padding_mask=None, scaling=self.scaling,
                           query_window=query_window, accumulated=cut(self.accumulated, 2),
                           values=cut(self.values, 2), hidden_states=cut(self.hidden_states, 1), module=self.module)


def check_int(name: str, value, minimum: int) -> int:
    """`value` itself when it is an int (not a bool) of at least `minimum`; else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_budget(max_capacity_prompt, window_size: int) -> None:
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
    """Shared behaviour. Subclasses are frozen dataclasses.

    observes: what prefill records for the policy besides keys and values (a subset of OBSERVATIONS);
    window_size: the last prompt queries kept for it when it observes "query_window" (and the positions it
    always keeps); per_head_slots: heads keep different numbers of positions (stored ragged: RaggedLayer).
    """

    window_size: int = 0
    observes: ClassVar[frozenset[str]] = frozenset()
    per_head_slots: ClassVar[bool] = False

    def budget(self, layer: int) -> int | None:
        """Prompt positions layer `layer` keeps; None keeps everything."""
        budget = getattr(self, "max_capacity_prompt", None)
        return budget[layer] if isinstance(budget, tuple) else budget

    def layer_budget(self, layer: int, prompt_length: int, compressed_layers: tuple[int, ...]) -> int | None:
        """Prompt positions `layer` keeps of a `prompt_length`-token prompt; `compressed_layers` lists the layers
        the policy may compress (every full-attention layer). Default: `budget(layer)`."""
        return self.budget(layer)

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

    def kept_positions(self, view: PrefillView, budget: int | Callable[[int], int]) -> torch.Tensor:
        """Kept input positions (batch, cache_heads, min(n, budget)), ascending; padded batches are
        selected row by row on real tokens, and slots a short row leaves empty are -1. `budget` may be a
        function of the prompt's length (PyramidKV's budgets are), called with each row's real length."""
        budget_of = budget if callable(budget) else lambda length: budget
        if view.padding_mask is None:
            if view.length <= budget_of(view.length):
                heads = self.cache_heads(view.query_heads, view.keys.shape[1])
                return torch.arange(view.length, device=view.keys.device).expand(view.keys.shape[0], heads, -1)
            return self.select(view, budget_of(view.length))
        return select_per_row(lambda row, real: self.kept_positions(view.row(row, real), budget_of)[0],
                              view.padding_mask, budget_of(view.length))


@dataclass(frozen=True)
class FullCache(Policy):
    """Keep everything: the reference every other policy is compared with."""

    def budget(self, layer: int) -> None:
        return None


@dataclass(frozen=True)
class ScoredPolicy(Policy):
    """A policy that is a score: subclasses define `score(view)`, float (batch, cache_heads, n), higher = keep.

    The last `window_size` positions are always kept; the rest of the budget (`max_capacity_prompt`, window
    included; a tuple gives one budget per layer) goes to the highest scores among the other positions, kept
    in ascending order. Scores of the window's positions are ignored. A padded batch is scored row by row on
    its real tokens. cache_heads is the model's kv heads (`cache_heads` says otherwise: SnapKV's gqa="expand").
    Declare in `observes` what `score` reads beyond `view.keys`, `view.values` and `view.module`.
    """

    max_capacity_prompt: int | tuple[int, ...] = 1024
    window_size: int = 32

    def __post_init__(self):
        check_int("window_size", self.window_size, 0)
        if isinstance(self.max_capacity_prompt, list):
            object.__setattr__(self, "max_capacity_prompt", tuple(self.max_capacity_prompt))
        check_budget(self.max_capacity_prompt, self.window_size)

    def score(self, view: PrefillView) -> torch.Tensor:
        """float (batch, cache_heads, n): how much each position deserves its slot (higher = keep)."""
        raise NotImplementedError(f"{type(self).__name__} must define score(self, view)")

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        scores = self.score(view)
        expected = (view.keys.shape[0], self.cache_heads(view.query_heads, view.keys.shape[1]), view.length)
        if tuple(scores.shape) != expected:
            raise ValueError(f"{type(self).__name__}.score returned shape {tuple(scores.shape)}; expected "
                             f"(batch, cache_heads, n) = {expected}")
        return self.select_from_scores(scores[..., : view.length - self.window_size], budget)

    def select_from_scores(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Kept positions (batch, cache_heads, budget), ascending, from the prefix's scores (batch, cache_heads,
        n - window_size): the top `budget - window_size` and the window."""
        return top_positions(scores, budget - self.window_size, self.window_size)


@dataclass(frozen=True)
class SnapKV(ScoredPolicy):
    """SnapKV (Algorithm 1): the score is the window's votes, pooled along positions and aggregated over GQA
    groups. max_capacity_prompt includes the window; a tuple gives one budget per layer."""

    kernel_size: int = 7
    pooling: str = "maxpool"
    gqa: str = "mean"
    observes: ClassVar[frozenset[str]] = frozenset({"query_window"})

    def __post_init__(self):
        check_int("window_size", self.window_size, 1)
        super().__post_init__()
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so pooling keeps positions aligned, got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {GQA_MODES}, got {self.gqa!r}")

    def cache_heads(self, heads: int, kv_heads: int) -> int:
        return heads if self.gqa == "expand" else kv_heads

    def score(self, view: PrefillView) -> torch.Tensor:
        votes = window_votes(view.query_window, view.keys, scaling=view.scaling)
        return F.pad(self.scores_from_votes(votes, view.keys.shape[1]), (0, self.window_size))

    def scores_from_votes(self, votes: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """The window's votes per query head (batch, heads, n - window) -> prefix scores (batch, cache_heads,
        n - window): pooled, then aggregated over each GQA group."""
        return snapkv_scores(votes, kv_heads, kernel_size=self.kernel_size, pooling=self.pooling, gqa=self.gqa)

    def select_from_votes(self, votes: torch.Tensor, budget: int, kv_heads: int) -> torch.Tensor:
        """Kept positions (batch, cache_heads, budget) from the window's votes per query head (batch, heads,
        n - window), as `select` would keep them (the explorer calls it on a recorded trace)."""
        return self.select_from_scores(self.scores_from_votes(votes, kv_heads), budget)


@dataclass(frozen=True)
class AdaKV(SnapKV):
    """Ada-KV on SnapKV's votes (Feng et al., 2024): the heads of a layer share its budget. Every head keeps the
    window and its top `alpha_safeguard` share of an even split; the remaining slots go to the highest votes of
    any head, so heads with concentrated attention leave slots to heads whose attention is spread. The cache
    holds each head's own number of slots (`RaggedLayer`)."""

    alpha_safeguard: float = 0.2
    per_head_slots: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ValueError(f"alpha_safeguard must be within [0, 1], got {self.alpha_safeguard}")

    def select_from_scores(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        return adaptive_positions(scores, budget - self.window_size, self.window_size, self.alpha_safeguard)


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024): SnapKV's selection with budgets that fall linearly with depth, from
    2K - K/beta prefix slots in the first compressed layer to K/beta in the last (K = max_capacity_prompt -
    window_size), about the same total as SnapKV at max_capacity_prompt (`selection.pyramid_budgets`).
    Depth counts compressed layers only (Gemma 3's sliding-window layers are never compressed)."""

    beta: int = 20

    def __post_init__(self):
        if isinstance(self.max_capacity_prompt, (list, tuple)):
            raise TypeError("PyramidKV sets the per-layer budgets itself: give max_capacity_prompt as one int")
        super().__post_init__()
        check_int("beta", self.beta, 1)

    def layer_budget(self, layer: int, prompt_length: int, compressed_layers: tuple[int, ...]) -> int:
        budgets = pyramid_budgets(self.max_capacity_prompt, self.window_size, prompt_length,
                                  len(compressed_layers), self.beta)
        return budgets[compressed_layers.index(layer)]


@dataclass(frozen=True)
class ChunkKV(SnapKV):
    """ChunkKV (Liu et al., 2025): SnapKV's votes summed over the heads of a layer and over chunks of
    `chunk_size` consecutive tokens; whole chunks are kept, the same for every head, so a value that spans
    several tokens is kept or dropped together."""

    chunk_size: int = 10

    def __post_init__(self):
        super().__post_init__()
        check_int("chunk_size", self.chunk_size, 1)
        if self.gqa == "expand":
            raise ValueError('ChunkKV keeps the same chunks for every head: gqa="expand" would only copy them; '
                             'use gqa="mean"')

    def scores_from_votes(self, votes: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """The pooled votes summed over every query head of the layer: one row, shared by the kv heads."""
        pooled = snapkv_scores(votes, kv_heads, kernel_size=self.kernel_size, pooling=self.pooling, gqa="expand")
        return pooled.sum(dim=1, keepdim=True).expand(-1, kv_heads, -1)

    def select_from_scores(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        kept = chunk_positions(scores[:, 0], budget - self.window_size, self.window_size, self.chunk_size)
        return kept[:, None].expand(-1, scores.shape[1], -1)


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """The first `sink_size` tokens (attention sinks) and the most recent ones."""

    sink_size: int = 4
    max_capacity_prompt: int = ScoredPolicy.max_capacity_prompt

    def __post_init__(self):
        check_int("sink_size", self.sink_size, 0)
        check_budget(self.max_capacity_prompt, self.sink_size)

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        b, kv_heads, n, _ = view.keys.shape
        return streaming_positions(n, budget, self.sink_size).to(view.keys.device).expand(b, kv_heads, budget)


@dataclass(frozen=True)
class RandomEviction(ScoredPolicy):
    """Uniformly random prefix positions per head, plus the last `window_size`. Reproducible with `seed`."""

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int("seed", self.seed, 0)

    def score(self, view: PrefillView) -> torch.Tensor:
        b, kv_heads, n, _ = view.keys.shape
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(b, kv_heads, n - self.window_size, generator=generator).to(view.keys.device)
        return F.pad(scores, (0, self.window_size))


@dataclass(frozen=True)
class H2O(ScoredPolicy):
    """Heavy hitters: the score is the attention a position received from ALL prompt queries (accumulated block
    by block during prefill), averaged over each GQA group; the last `window_size` positions are kept too."""

    observes: ClassVar[frozenset[str]] = frozenset({"accumulated_attention"})

    def score(self, view: PrefillView) -> torch.Tensor:
        kv_heads = view.keys.shape[1]
        b, heads, n = view.accumulated.shape
        return view.accumulated.reshape(b, kv_heads, heads // kv_heads, n).mean(dim=2)


def accumulate(previous: torch.Tensor | None, queries, keys, scaling, padding_mask) -> torch.Tensor:
    """Add one prefill call's accumulated attention (queries are the last rows of `keys`)."""
    new = accumulated_attention(queries, keys, scaling=scaling, padding_mask=padding_mask)
    if previous is not None:
        new[..., : previous.shape[-1]] += previous
    return new
