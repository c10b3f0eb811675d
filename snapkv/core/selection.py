"""Pure tensor functions: which prompt positions each head keeps.

Shapes follow transformers: queries (batch, heads, positions, head_dim), keys
(batch, kv_heads, positions, head_dim), post-RoPE. Scores are computed in float32
whatever the model dtype. Nothing here builds an n x n matrix: SnapKV looks at the
last `window_size` queries only (window x n), H2O walks the prompt in row blocks.
"""


import torch
import torch.nn.functional as F

POOLINGS = ("maxpool", "avgpool", "none")
GQA_MODES = ("mean", "max", "expand")


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, n, d) -> (batch, kv_heads * groups, n, d), each kv head repeated `groups` times."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def observation_attention(
    query_window: torch.Tensor,
    keys: torch.Tensor,
    *,
    scaling: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of the last `window` prompt tokens over the whole prompt.

    query_window: (batch, heads, window, head_dim), the queries of prompt positions n-window .. n-1.
    keys: (batch, kv_heads, n, head_dim). padding_mask: (batch, n) bool, True for real tokens.
    Returns float32 (batch, heads, window, n): softmax(q k^T * scaling), causal inside the window,
    padding columns zero. These are the probabilities SnapKV votes with and the recorder stores.
    """
    batch, heads, window, head_dim = query_window.shape
    n = keys.shape[-2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    k = repeat_kv(keys.float(), heads // keys.shape[1])
    logits = torch.matmul(query_window.float(), k.transpose(2, 3)) * scaling
    row_pos = torch.arange(n - window, n, device=keys.device)[:, None]
    visible = torch.arange(n, device=keys.device)[None, :] <= row_pos  # (window, n), causal
    visible = visible[None, None]
    if padding_mask is not None:
        visible = visible & padding_mask[:, None, None, :].bool()
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1)


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along positions, stride 1, padding kernel_size // 2 (Algorithm 1, step 4).

    scores: (batch, heads, positions) -> same shape.
    """
    if pooling == "none" or kernel_size == 1:
        return scores
    b, h, n = scores.shape
    flat = scores.reshape(b * h, 1, n)
    if pooling == "maxpool":
        pooled = F.max_pool1d(flat, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    elif pooling == "avgpool":
        pooled = F.avg_pool1d(flat, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooled.reshape(b, h, n)


def aggregate_gqa(scores: torch.Tensor, kv_heads: int, gqa: str) -> torch.Tensor:
    """Scores per query head (batch, heads, n) -> per cache head.

    "expand": one cache head per query head (the authors' code); "mean"/"max": reduce each
    group of query heads sharing a kv head, so the cache keeps kv_heads heads.
    """
    if gqa == "expand":
        return scores
    b, h, n = scores.shape
    grouped = scores.reshape(b, kv_heads, h // kv_heads, n)
    if gqa == "mean":
        return grouped.mean(dim=2)
    if gqa == "max":
        return grouped.amax(dim=2)
    raise ValueError(f"gqa must be one of {GQA_MODES}, got {gqa!r}")


def top_positions(scores: torch.Tensor, k: int, tail: int) -> torch.Tensor:
    """Keep the top-k prefix positions by score plus the last `tail` positions, ascending.

    scores: (batch, cache_heads, n - tail) over the prefix. Returns long (batch, cache_heads, k + tail).
    """
    b, h, prefix = scores.shape
    top = scores.topk(k, dim=-1).indices
    window = torch.arange(prefix, prefix + tail, device=scores.device).expand(b, h, tail)
    return torch.cat([top, window], dim=-1).sort(dim=-1).values


def ranked_positions(scores: torch.Tensor, tail: int) -> torch.Tensor:
    """Every position, best first: the last `tail` positions, then the prefix by descending score (ties: the
    earlier position first). scores: (batch, cache_heads, n - tail). Returns long (batch, cache_heads, n); its
    first k + tail entries are `top_positions(scores, k, tail)` when no scores tie at the cut."""
    b, h, prefix = scores.shape
    window = torch.arange(prefix, prefix + tail, device=scores.device).expand(b, h, tail)
    return torch.cat([window, scores.argsort(dim=-1, descending=True, stable=True)], dim=-1)


def select_per_row(select_row, padding_mask: torch.Tensor, budget: int) -> torch.Tensor:
    """Select on each row's real tokens alone, so a padded batch keeps what its rows keep alone.

    select_row(row, real) -> long (cache_heads, k) indices into `real` (the row's real positions).
    padding_mask: (batch, n) bool. Returns long (batch, cache_heads, width) input positions, ascending, width
    min(n, budget) (more when a policy's heads keep different numbers, as AdaKV's: the most any row holds);
    a row that keeps fewer (fewer real tokens than the budget: it keeps them all) fills the front with -1.
    """
    kept = []
    for row, mask in enumerate(padding_mask):
        real = mask.nonzero().squeeze(-1)
        chosen = select_row(row, real)
        kept.append(torch.where(chosen >= 0, real[chosen.clamp(min=0)], -1))
    width = max(min(padding_mask.shape[-1], budget), *(k.shape[-1] for k in kept))
    return torch.stack([F.pad(k, (width - k.shape[-1], 0), value=-1) for k in kept])


def window_votes(query_window: torch.Tensor, keys: torch.Tensor, *, scaling: float | None = None) -> torch.Tensor:
    """Votes of the observation window for every prefix position, per query head (Algorithm 1, step 3):
    float32 (batch, heads, n - window), the window's attention summed over its queries."""
    window = query_window.shape[-2]
    return observation_attention(query_window, keys, scaling=scaling)[..., :-window].sum(dim=-2)


def snapkv_scores(votes: torch.Tensor, kv_heads: int, *, kernel_size: int, pooling: str, gqa: str = "mean"
                  ) -> torch.Tensor:
    """Votes per query head (batch, heads, prefix) -> SnapKV's scores per cache head: pooled (step 4), then
    aggregated over GQA groups. float32 (batch, cache_heads, prefix)."""
    return aggregate_gqa(pool_scores(votes, kernel_size, pooling), kv_heads, gqa)


def select_positions(
    query_window: torch.Tensor,
    keys: torch.Tensor,
    *,
    window_size: int,
    max_capacity_prompt: int,
    kernel_size: int,
    pooling: str,
    gqa: str = "mean",
    scaling: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SnapKV's Algorithm 1: the prompt positions each cache head keeps.

    query_window: (batch, heads, window_size, head_dim) post-RoPE queries of the last prompt tokens.
    keys: (batch, kv_heads, n, head_dim) post-RoPE keys of the whole prompt.
    Returns long (batch, cache_heads, min(n, max_capacity_prompt)), ascending, the window included;
    cache_heads is `heads` for gqa="expand", else `kv_heads`. With a padding_mask (batch, n) each row
    is selected on its real tokens alone; a row shorter than the budget marks unused slots -1.
    """
    if query_window.shape[-2] != window_size:
        raise ValueError(f"query_window holds {query_window.shape[-2]} queries, expected window_size={window_size}")
    batch, heads = query_window.shape[:2]
    n = keys.shape[-2]
    cache_heads = heads if gqa == "expand" else keys.shape[1]
    settings = dict(window_size=window_size, max_capacity_prompt=max_capacity_prompt, kernel_size=kernel_size,
                    pooling=pooling, gqa=gqa, scaling=scaling)
    if padding_mask is not None and not bool(padding_mask.all()):
        return select_per_row(
            lambda row, real: select_positions(query_window[row : row + 1], keys[row : row + 1, :, real],
                                               **settings)[0],
            padding_mask, max_capacity_prompt,
        )
    if n <= max_capacity_prompt:
        return torch.arange(n, device=keys.device).expand(batch, cache_heads, n)
    scores = snapkv_scores(window_votes(query_window, keys, scaling=scaling), keys.shape[1], kernel_size=kernel_size,
                           pooling=pooling, gqa=gqa)
    return top_positions(scores, max_capacity_prompt - window_size, window_size)


def accumulated_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    scaling: float | None = None,
    padding_mask: torch.Tensor | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """H2O's heavy-hitter score: attention each key receives, summed over causal queries.

    queries: (batch, heads, q, head_dim) are the LAST q of the n positions in `keys`
    (batch, kv_heads, n, head_dim). Works on `block_size` query rows at a time, each against only the
    keys up to its last row (the causal triangle), so memory is block_size x n, never n x n. A block's
    column sums are one matrix-vector product of its unnormalised probabilities with the inverse row
    sums, so the normalised probabilities are never written. Returns float32 (batch, heads, n).
    """
    batch, heads, q, head_dim = queries.shape
    n = keys.shape[-2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    k = repeat_kv(keys.float(), heads // keys.shape[1]).transpose(2, 3)
    real = None if padding_mask is None else padding_mask.bool()
    total = torch.zeros(batch, heads, n, dtype=torch.float32, device=keys.device)
    for start in range(0, q, block_size):
        rows = queries[:, :, start : start + block_size].float() * scaling
        first = n - q + start  # position of the block's first query; keys after its last are never seen
        end = first + rows.shape[2]
        logits = torch.matmul(rows, k[..., :end])
        future = torch.ones(rows.shape[2], rows.shape[2], dtype=torch.bool, device=keys.device).triu(1)
        logits[..., first:].masked_fill_(future, float("-inf"))
        if real is not None:
            logits.masked_fill_(~real[:, None, None, :end], float("-inf"))
        unnormalised = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        inverse_sums = unnormalised.sum(dim=-1).reciprocal_()
        if real is not None:  # a padding query sees nothing (its row is all NaN) and adds nothing
            unnormalised.nan_to_num_(0.0)
            inverse_sums = torch.where(real[:, None, first:end], inverse_sums, 0.0)
        total[..., :end] += torch.matmul(inverse_sums.unsqueeze(-2), unnormalised).squeeze(-2)
    return total


def streaming_positions(n: int, budget: int, sink_size: int) -> torch.Tensor:
    """StreamingLLM: the first `sink_size` positions (attention sinks) and the most recent ones. (budget,)."""
    return torch.cat([torch.arange(sink_size), torch.arange(n - (budget - sink_size), n)])


def adaptive_positions(scores: torch.Tensor, k: int, tail: int, alpha_safeguard: float) -> torch.Tensor:
    """AdaKV: the layer's heads share `heads x k` prefix slots; each head first gets its top
    `int(alpha_safeguard x k)` positions, then the rest go to the highest scores of any head.

    scores: (batch, cache_heads, n - tail). Returns long (batch, cache_heads, most + tail): each head's kept
    prefix positions ascending, front-filled with -1 up to the head that keeps the most, then the last `tail`.
    """
    b, h, prefix = scores.shape
    safe = int(alpha_safeguard * k)
    scores = scores.clone()
    if safe:
        scores.scatter_(-1, scores.topk(safe, dim=-1).indices, float("inf"))
    chosen = torch.zeros(b, h * prefix, dtype=torch.bool, device=scores.device)
    chosen[torch.arange(b, device=scores.device)[:, None], scores.reshape(b, -1).topk(h * k, dim=-1).indices] = True
    chosen = chosen.reshape(b, h, prefix)
    most = int(chosen.sum(-1).max())
    marked = torch.where(chosen, torch.arange(prefix, device=scores.device), -1)
    kept = marked.sort(dim=-1).values[..., prefix - most :]  # -1 sorts first: each head's kept positions last
    window = torch.arange(prefix, prefix + tail, device=scores.device).expand(b, h, tail)
    return torch.cat([kept, window], dim=-1)


def chunk_positions(scores: torch.Tensor, k: int, tail: int, chunk_size: int) -> torch.Tensor:
    """ChunkKV: whole chunks of `chunk_size` consecutive prefix positions, ranked by their score summed over
    the chunk. The lowest-ranked chunk that fits only in part keeps its best-scoring positions, so exactly k
    prefix positions are kept.

    scores: (batch, n - tail), one row for every head. Returns long (batch, k + tail), ascending.
    """
    b, prefix = scores.shape
    chunk = torch.arange(prefix, device=scores.device) // chunk_size
    chunk_scores = torch.zeros(b, int(chunk[-1]) + 1, device=scores.device).index_add_(1, chunk, scores)
    rank = torch.empty_like(chunk_scores, dtype=torch.long).scatter_(
        1, chunk_scores.argsort(dim=-1, descending=True, stable=True),
        torch.arange(chunk_scores.shape[1], device=scores.device).expand(b, -1))
    order = scores.argsort(dim=-1, descending=True, stable=True)  # positions by their own score ...
    order = order.gather(1, rank.gather(1, chunk[order]).argsort(dim=-1, stable=True))  # ... within chunk rank
    top = order[:, :k].sort(dim=-1).values
    window = torch.arange(prefix, prefix + tail, device=scores.device).expand(b, tail)
    return torch.cat([top, window], dim=-1)


def pyramid_budgets(budget: int, window_size: int, prompt_length: int, layers: int, beta: int) -> list[int]:
    """PyramidKV's per-layer budgets (window included), first layer to last: an arithmetic sequence of
    prefix slots from 2K - K/beta down to K/beta (K = budget - window_size), capped at the prompt's prefix
    and then mirrored around K, so that the layers keep about `layers x budget` slots in all."""
    if layers == 1:
        return [budget]
    k = budget - window_size
    least = k // beta
    most = 2 * k - least
    if most >= prompt_length - window_size:
        most = prompt_length - window_size
        least = 2 * k - most
    step = (most - least) // (layers - 1)
    return [most - layer * step + window_size for layer in range(layers)]
