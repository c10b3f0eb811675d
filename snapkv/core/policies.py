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
"accumulated_attention", "hidden_states", "input_ids", ...: `OBSERVATIONS`); nothing else is computed.

Scores: SnapKV and its successors (AdaKV, PyramidKV, ChunkKV), H2O, KNorm (the smallest keys) and ExpectedAttention
(the attention future queries, modelled on the prompt's, would pay). Wrappers of any policy: BoundaryProtection (a
share of the budget for the prompt's first and last tokens) and SpanKeeping (a kept token brings its whole word, line
or sentence, read from the prompt's token ids: `snapkv.core.units`). Every policy can rank all positions
(`Policy.ranking`), which is what SpanKeeping walks.
"""

import math
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from snapkv.core import units
from snapkv.core.queries import average_rotation, prerope_queries, rope_frequencies
from snapkv.core.selection import (
    GQA_MODES,
    POOLINGS,
    accumulated_attention,
    adaptive_positions,
    chunk_positions,
    pyramid_budgets,
    ranked_positions,
    repeat_kv,
    select_per_row,
    snapkv_scores,
    streaming_positions,
    top_positions,
    window_votes,
)

OBSERVATIONS = ("query_window", "accumulated_attention", "hidden_states", "reconstruction", "input_ids")


@dataclass(frozen=True)
class PrefillView:
    """What a layer saw during prefill, for one prompt (what the policy does not observe is None).

    keys, values (batch, kv_heads, n, head_dim), post-RoPE; padding_mask (batch, n) bool, None if every token is
    real; scaling: the layer's softmax scale; query_window (batch, heads, <= window, head_dim): the last prompt
    queries ("query_window"); accumulated (batch, heads, n): attention received by each key from every prompt
    query ("accumulated_attention"); hidden_states (batch, n, hidden): the attention module's input
    ("hidden_states"); module: the attention module (its projections, `config`, `layer_idx`); reconstruction
    (batch, kv_heads, n): scores the policy's `reconstruct` computed from the whole prompt's cache ("reconstruction":
    KVzip's, `snapkv.core.kvzip`); input_ids (batch, n): the prompt's token ids ("input_ids").
    """

    keys: torch.Tensor
    padding_mask: torch.Tensor | None
    scaling: float
    query_window: torch.Tensor | None = None
    accumulated: torch.Tensor | None = None
    values: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    module: torch.nn.Module | None = None
    reconstruction: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None

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
                           values=cut(self.values, 2), hidden_states=cut(self.hidden_states, 1), module=self.module,
                           reconstruction=cut(self.reconstruction, 2), input_ids=cut(self.input_ids, 1))

    def cut(self, positions: torch.Tensor) -> "PrefillView":
        """The view of `positions` (long (m,), ascending) alone, as if the prompt held only them; the query
        window (the prompt's last queries) stays."""

        def take(tensor, dim):
            return None if tensor is None else tensor.index_select(dim, positions)

        return replace(self, keys=take(self.keys, 2), padding_mask=take(self.padding_mask, 1),
                       accumulated=take(self.accumulated, 2), values=take(self.values, 2),
                       hidden_states=take(self.hidden_states, 1), reconstruction=take(self.reconstruction, 2),
                       input_ids=take(self.input_ids, 1))


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

    def ranking(self, view: PrefillView, budget: int) -> torch.Tensor:
        """Every position (batch, cache_heads, n), best first, for a prompt longer than `budget` with no padding:
        what SpanKeeping walks. Default: the positions `select(view, budget)` keeps, then the others, each group
        from the most recent (a score ranks every position: `ScoredPolicy.ranking`)."""
        kept = self.select(view, budget)
        n = view.length
        chosen = torch.zeros(*kept.shape[:2], n + 1, dtype=torch.long, device=kept.device)
        chosen.scatter_(2, torch.where(kept >= 0, kept, n), 1)
        return (chosen[..., :n] * n + torch.arange(n, device=kept.device)).argsort(dim=-1, descending=True)

    def reconstruct(self, model, cache, input_ids: torch.Tensor, padding_mask: torch.Tensor | None,
                    layers) -> dict[int, torch.Tensor]:
        """(a policy that observes "reconstruction") {layer: float (batch, cache_heads, n)} for `layers`, computed
        with further forwards of `model` on `cache`, which holds the whole prompt `input_ids` (batch, n) and must be
        left as it is; the session calls it once the prompt is complete and passes each layer's scores as
        `PrefillView.reconstruction` (KVzip: `snapkv.core.kvzip`)."""
        raise NotImplementedError(f"{type(self).__name__} observes 'reconstruction' but defines no reconstruct()")

    # the hashable setting that decides `reconstruct`'s scores: the forks of one observer that share it compute them
    # once per prompt (`CompressionSession`); None: never shared
    reconstruction_key = None

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

    def prefix_scores(self, view: PrefillView) -> torch.Tensor:
        """`score(view)` of the positions before the window (batch, cache_heads, n - window_size), its shape
        checked."""
        scores = self.score(view)
        expected = (view.keys.shape[0], self.cache_heads(view.query_heads, view.keys.shape[1]), view.length)
        if tuple(scores.shape) != expected:
            raise ValueError(f"{type(self).__name__}.score returned shape {tuple(scores.shape)}; expected "
                             f"(batch, cache_heads, n) = {expected}")
        return scores[..., : view.length - self.window_size]

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        return self.select_from_scores(self.prefix_scores(view), budget)

    def ranking(self, view: PrefillView, budget: int) -> torch.Tensor:
        """The window, then the other positions by descending score (ties: the earlier first). A policy that
        allocates otherwise in `select_from_scores` (AdaKV's shared budget, ChunkKV's chunks) ranks by score too."""
        return ranked_positions(self.prefix_scores(view), self.window_size)

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


@dataclass(frozen=True)
class KNorm(ScoredPolicy):
    """Key norm (Devoto et al., 2024, arXiv 2406.11430; kvpress's `KnormPress`): keep the keys of smallest L2 norm
    in each kv head, plus the last `window_size` positions. As kvpress: the score is -||k|| of the post-RoPE key in
    the cache (RoPE rotates pairs of dimensions, so the norm is the pre-RoPE one too), in float32 at least, ties go
    to `topk`; unlike kvpress, a budget of positions with a window instead of a compression ratio (window_size=0
    keeps kvpress's choice: the same positions in every layer and head, `benchmarks/peers.py`)."""

    def score(self, view: PrefillView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)


@dataclass(frozen=True)
class ExpectedAttention(ScoredPolicy):
    """Expected attention (Devoto et al., 2025, arXiv 2510.00636; kvpress's `ExpectedAttentionPress`, its defaults):
    the attention that future queries are expected to pay each key, modelled from the prompt's queries.

    As kvpress, per layer: the pre-RoPE queries of the prompt but its first `n_sink` tokens (q_proj and q_norm of
    the attention module's input: "hidden_states") give a mean mu and a covariance S (divided by their count) per
    query head; RoPE's rotation averaged over the `n_future_positions` positions after the prompt, R, turns them
    into R mu and R S R^T; each key k but the sinks scores exp(k.R mu / sqrt(d) + k^T R S R^T k / (2d)) (d: head
    dim; the mean of exp(q.k / sqrt(d)) over Gaussian queries), softmax-normalised over the keys of each query head,
    averaged over the GQA group, then (score + epsilon) x ||v|| (`use_vnorm`); the sinks score above every other
    position, so they are always kept. use_covariance=False drops the S term.

    Unlike kvpress: the budget is a number of positions, with the last `window_size` always kept (window_size=0
    keeps kvpress's choice); everything in float32 (kvpress: the model's dtype); RoPE from the config of the
    layer's type (`snapkv.core.queries.rope_frequencies`, kvpress: the model's rotary module, which in
    transformers 5 takes Gemma 3's layer type as an argument kvpress does not pass), and for dynamic RoPE types
    the frequencies of the model's base length."""

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    observes: ClassVar[frozenset[str]] = frozenset({"hidden_states"})

    def __post_init__(self):
        super().__post_init__()
        check_int("n_future_positions", self.n_future_positions, 1)
        check_int("n_sink", self.n_sink, 0)
        for name in ("use_covariance", "use_vnorm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or self.epsilon < 0:
            raise ValueError(f"epsilon must be a number >= 0, got {self.epsilon!r}")

    def score(self, view: PrefillView) -> torch.Tensor:
        batch, kv_heads, n, head_dim = view.keys.shape
        if n <= self.n_sink:  # every position is a sink
            return view.keys.new_ones(batch, kv_heads, n, dtype=torch.float)
        queries = prerope_queries(view.module, view.hidden_states[:, self.n_sink :])  # (batch, heads, m, d)
        heads, m = queries.shape[1], queries.shape[2]
        rotation = average_rotation(*rope_frequencies(view.module.config, view.module.layer_idx, head_dim),
                                    start=n, count=self.n_future_positions).to(queries.device)
        mean = queries.mean(dim=2)
        keys = repeat_kv(view.keys[:, :, self.n_sink :].float(), heads // kv_heads)  # (batch, heads, m, d)
        logits = keys @ (mean @ rotation.T)[..., None] / math.sqrt(head_dim)
        logits = logits.squeeze(-1)
        if self.use_covariance:
            centered = queries - mean[:, :, None]
            covariance = rotation @ (centered.transpose(2, 3) @ centered / m) @ rotation.T
            logits = logits + torch.einsum("bhnd,bhde,bhne->bhn", keys, covariance, keys) / head_dim / 2
        scores = logits.softmax(dim=-1).view(batch, kv_heads, heads // kv_heads, m).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * view.values[:, :, self.n_sink :].float().norm(dim=-1)
        return F.pad(scores, (self.n_sink, 0), value=float(scores.max()) + 1)


class WrappingPolicy(Policy):
    """A policy around another one, its field `policy`: the budgets (per layer too), window, cache heads and
    observations are the wrapped policy's."""

    @property
    def window_size(self) -> int:
        return self.policy.window_size

    @property
    def observes(self) -> frozenset[str]:
        return self.policy.observes

    def budget(self, layer: int) -> int | None:
        return self.policy.budget(layer)

    def layer_budget(self, layer: int, prompt_length: int, compressed_layers: tuple[int, ...]) -> int | None:
        return self.policy.layer_budget(layer, prompt_length, compressed_layers)

    def cache_heads(self, heads: int, kv_heads: int) -> int:
        return self.policy.cache_heads(heads, kv_heads)

    def check_model(self, num_layers: int) -> None:
        self.policy.check_model(num_layers)

    def reconstruct(self, model, cache, input_ids, padding_mask, layers) -> dict[int, torch.Tensor]:
        return self.policy.reconstruct(model, cache, input_ids, padding_mask, layers)

    @property
    def reconstruction_key(self):
        return self.policy.reconstruction_key

    def check_policy(self) -> None:
        if not isinstance(self.policy, Policy):
            raise TypeError(f"{type(self).__name__} wraps a snapkv policy (SnapKV(), KNorm(), ...), got "
                            f"{type(self.policy).__name__}")


def keep_among(policy: Policy, view: PrefillView, positions: torch.Tensor, budget: int) -> torch.Tensor:
    """What `policy` keeps at `budget` when it may keep only `positions` (long (m,), ascending, ending with its
    window): input positions (batch, cache_heads, <= budget), -1 for slots a head leaves empty. A ScoredPolicy
    scores the whole prompt and keeps the best of `positions`; any other policy selects on the view cut to them."""
    if isinstance(policy, ScoredPolicy):
        prefix = positions[: positions.numel() - policy.window_size]
        chosen = policy.select_from_scores(policy.prefix_scores(view)[..., prefix], budget)
    else:
        chosen = policy.select(view.cut(positions), budget)
    return torch.where(chosen >= 0, positions[chosen.clamp(min=0)], -1)


def rank_among(policy: Policy, view: PrefillView, positions: torch.Tensor, budget: int) -> torch.Tensor:
    """`positions` (long (m,), ascending, ending with the window) as `policy` ranks them, best first (batch,
    cache_heads, m), `budget` being what it keeps of them: as `keep_among`, a ScoredPolicy by its scores of the
    whole prompt, any other policy on the view cut to them."""
    if isinstance(policy, ScoredPolicy):
        prefix = positions[: positions.numel() - policy.window_size]
        order = ranked_positions(policy.prefix_scores(view)[..., prefix], policy.window_size)
    else:
        order = policy.ranking(view.cut(positions), budget)
    return positions[order]


@dataclass(frozen=True)
class BoundaryProtection(WrappingPolicy):
    """Boundary protection (Garcia, 2026, arXiv 2605.18053, "Protection Is (Nearly) All You Need"): `share` of the
    budget is reserved for the prompt's boundaries, half for its first tokens (the attention sinks, the start of the
    instruction) and half for its last tokens before the window (the end of the context); the wrapped policy
    chooses the rest of the budget, with its window, among the other positions. The paper reserves 10% of the cache
    at each boundary (share=0.2), there at decode time under one cap for all heads; here at the end of prefill, per
    layer and head.

    Each boundary gets int(share x budget / 2) positions (fewer when the wrapped policy's window would not fit). A
    ScoredPolicy still scores the whole prompt and keeps its best other positions with its own `select_from_scores`
    (AdaKV's per-head counts, ChunkKV's chunks); any other policy selects on the view cut to the other positions
    (`PrefillView.cut`). Per-layer budgets, cache heads, observations and per-head slot counts are the wrapped
    policy's."""

    policy: Policy
    share: float = 0.2

    def __post_init__(self):
        self.check_policy()
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)):
            raise TypeError(f"share must be a number, got {type(self.share).__name__} ({self.share!r})")
        if not 0 < self.share < 1:
            raise ValueError(f"share is the budget's share reserved for the prompt's boundaries: it must be within "
                             f"(0, 1), got {self.share}")

    @property
    def per_head_slots(self) -> bool:
        return self.policy.per_head_slots

    def edge(self, budget: int) -> int:
        """Positions reserved at each boundary of a prompt kept at `budget`."""
        return min(int(self.share * budget / 2), (budget - self.window_size) // 2)

    def split(self, n: int, budget: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(reserved, others) of an n-position prompt kept at `budget`: long (2 x edge,) and the rest, ascending."""
        edge, window = self.edge(budget), self.window_size
        reserved = torch.cat([torch.arange(edge), torch.arange(n - window - edge, n - window)])
        others = torch.cat([torch.arange(edge, n - window - edge), torch.arange(n - window, n)])
        return reserved.to(device), others.to(device)

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        reserved, others = self.split(view.length, budget, view.keys.device)
        chosen = keep_among(self.policy, view, others, budget - reserved.numel())
        reserved = reserved.expand(*chosen.shape[:2], -1)
        return torch.cat([reserved, chosen], dim=-1).sort(dim=-1).values

    def ranking(self, view: PrefillView, budget: int) -> torch.Tensor:
        """The reserved positions, then the others as the wrapped policy ranks them."""
        reserved, others = self.split(view.length, budget, view.keys.device)
        ranked = rank_among(self.policy, view, others, budget - reserved.numel())
        return torch.cat([reserved.expand(*ranked.shape[:2], -1), ranked], dim=-1)


@dataclass(frozen=True)
class SpanKeeping(WrappingPolicy):
    """Keep whole units of text: a position the wrapped policy keeps brings the rest of its `unit` ("word": a run
    of tokens with no whitespace or punctuation between them, so a number's digits are one unit; "line";
    "sentence": `snapkv.core.units`), within the budget.

    The window is kept; then the wrapped policy's ranking (`Policy.ranking`: a score's order, the reserved positions
    first for BoundaryProtection) is walked, each position bringing its whole unit, until the budget (window
    included) is full. The first unit that does not fit is cut to its best-ranked positions, which fill the budget
    exactly: at most one kept unit is partial. Every head keeps `budget` positions (a wrapped AdaKV lends its
    ranking, not its per-head counts).

    Units come from the prompt's token ids (the observation "input_ids") and the tokenizer: give `tokenizer=` (any
    transformers tokenizer); it is kept as `token_roles`, a short string of each token id's role (`units.token_roles`),
    so the policy stays frozen, hashable and saved in a KV pack.
    """

    policy: Policy
    tokenizer: InitVar[object] = None
    unit: str = "word"
    token_roles: str = field(default="", repr=False)

    def __post_init__(self, tokenizer):
        self.check_policy()
        if self.unit not in units.UNITS:
            raise ValueError(f"unit must be one of {units.UNITS}, got {self.unit!r}")
        if tokenizer is not None:
            if self.token_roles:
                raise TypeError("give SpanKeeping a tokenizer or its token_roles, not both")
            object.__setattr__(self, "token_roles", units.token_roles(tokenizer))
        if not self.token_roles:
            raise ValueError("SpanKeeping finds units in the token text: give the model's tokenizer, "
                             "SpanKeeping(policy, tokenizer=tokenizer)")
        units.decode_roles(self.token_roles)

    @property
    def observes(self) -> frozenset[str]:
        return self.policy.observes | {"input_ids"}

    def select(self, view: PrefillView, budget: int) -> torch.Tensor:
        unit_of = units.unit_index(view.input_ids, units.decode_roles(self.token_roles), self.unit)
        return units.span_positions(self.policy.ranking(view, budget), unit_of, budget, self.window_size)
