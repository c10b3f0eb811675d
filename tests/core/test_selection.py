"""Selection math against straightforward references of the paper's Algorithm 1."""

import math

import pytest
import torch
import torch.nn.functional as F

from snapkv.core.selection import accumulated_attention, observation_attention, select_positions


def authors_reference(query, keys, window, budget, kernel, pooling):
    """Algorithm 1 as the authors' code writes it (one cache head per query head)."""
    n, head_dim = keys.shape[-2], keys.shape[-1]
    if n < budget:
        return None
    weights = torch.matmul(query[..., -window:, :], keys.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.full((window, window), torch.finfo(weights.dtype).min)
    cond = torch.arange(window)
    mask.masked_fill_(cond < (cond + 1).view(window, 1), 0)
    weights[:, :, -window:, -window:] += mask[None, None]
    weights = F.softmax(weights, dim=-1, dtype=torch.float32)
    votes = weights[:, :, -window:, :-window].sum(dim=-2)
    if pooling == "avgpool":
        votes = F.avg_pool1d(votes, kernel_size=kernel, padding=kernel // 2, stride=1)
    elif pooling == "maxpool":
        votes = F.max_pool1d(votes, kernel_size=kernel, padding=kernel // 2, stride=1)
    return votes.topk(budget - window, dim=-1).indices


def as_sets(positions):
    return [[set(row.tolist()) for row in head] for head in positions]


@pytest.mark.parametrize("pooling,kernel", [("maxpool", 7), ("avgpool", 5), ("none", 1), ("maxpool", 3)])
@pytest.mark.parametrize("n,window,budget", [(200, 16, 64), (97, 8, 40), (64, 32, 64)])
def test_expand_matches_authors_code(pooling, kernel, n, window, budget):
    torch.manual_seed(n + budget)
    query = torch.randn(2, 4, window, 32)
    keys = torch.randn(2, 4, n, 32)
    kept = select_positions(query, keys, window_size=window, max_capacity_prompt=budget,
                            kernel_size=kernel, pooling=pooling, gqa="expand")
    assert kept.shape == (2, 4, budget)
    assert torch.equal(kept, kept.sort(dim=-1).values)
    reference = authors_reference(query, keys, window, budget, kernel, pooling)
    window_positions = set(range(n - window, n))
    for got, ref in zip(as_sets(kept), as_sets(reference)):
        for got_head, ref_head in zip(got, ref):
            assert got_head == ref_head | window_positions


@pytest.mark.parametrize("gqa,reduce", [("mean", torch.mean), ("max", torch.amax)])
def test_grouped_heads_reduce_votes_per_kv_head(gqa, reduce):
    torch.manual_seed(1)
    window, budget, kernel = 8, 30, 5
    query, keys = torch.randn(1, 6, window, 16), torch.randn(1, 2, 120, 16)
    kept = select_positions(query, keys, window_size=window, max_capacity_prompt=budget,
                            kernel_size=kernel, pooling="avgpool", gqa=gqa)
    assert kept.shape == (1, 2, budget)
    # reference: per query head votes, pooled, then reduced over the 3 heads of each kv head
    expanded = keys.repeat_interleave(3, dim=1)
    logits = query @ expanded.transpose(2, 3) / 4.0
    causal = torch.arange(120)[None, :] <= torch.arange(112, 120)[:, None]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    votes = F.avg_pool1d(probs[..., :-window].sum(-2), kernel, padding=kernel // 2, stride=1)
    grouped = reduce(votes.view(1, 2, 3, -1), dim=2)
    top = grouped.topk(budget - window, dim=-1).indices
    for head in range(2):
        assert set(kept[0, head].tolist()) == set(top[0, head].tolist()) | set(range(112, 120))


def test_short_prompt_keeps_everything():
    kept = select_positions(torch.randn(1, 4, 8, 16), torch.randn(1, 2, 50, 16), window_size=8,
                            max_capacity_prompt=50, kernel_size=3, pooling="maxpool")
    assert torch.equal(kept, torch.arange(50).expand(1, 2, 50))


def test_padding_is_never_kept_and_rows_match_unpadded():
    torch.manual_seed(2)
    window, budget, pad = 8, 24, 11
    query, keys = torch.randn(1, 4, window, 16), torch.randn(1, 2, 70, 16)
    alone = select_positions(query, keys, window_size=window, max_capacity_prompt=budget,
                             kernel_size=3, pooling="maxpool")
    padded_keys = torch.cat([torch.randn(1, 2, pad, 16) * 50, keys], dim=2)  # loud junk in the padding
    padding = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 70, dtype=torch.bool)], dim=1)
    batched = select_positions(query, padded_keys, window_size=window, max_capacity_prompt=budget,
                               kernel_size=3, pooling="maxpool", padding_mask=padding)
    assert bool((batched >= pad).all())
    assert torch.equal(batched - pad, alone)


def test_observation_attention_rows_are_causal_distributions():
    torch.manual_seed(3)
    probs = observation_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 1, 10, 8))
    assert probs.shape == (1, 2, 4, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2, 4))
    for row in range(4):  # window row i sits at position 6 + i and sees nothing after it
        assert bool((probs[..., row, 7 + row:] == 0).all())


def test_accumulated_attention_equals_full_matrix_column_sums():
    torch.manual_seed(4)
    queries, keys = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    got = accumulated_attention(queries, keys, block_size=7)
    logits = queries @ keys.repeat_interleave(2, 1).transpose(2, 3) * 8**-0.5
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    full = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    assert torch.allclose(got, full.sum(dim=2), atol=1e-5)
    # the last 10 queries only (a prefill chunk) against all 40 keys
    assert torch.allclose(accumulated_attention(queries[:, :, 30:], keys), full[:, :, 30:].sum(2), atol=1e-5)


def test_accumulated_attention_with_left_padding_equals_the_unpadded_prompt():
    torch.manual_seed(5)
    pad, n = 6, 30
    queries, keys = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8)
    alone = accumulated_attention(queries, keys, block_size=7)
    padded_queries = torch.cat([torch.randn(1, 4, pad, 8), queries], dim=2)  # padding holds garbage
    padded_keys = torch.cat([torch.randn(1, 2, pad, 8), keys], dim=2)
    real = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool)], dim=1)
    got = accumulated_attention(padded_queries, padded_keys, padding_mask=real, block_size=7)
    assert bool(torch.isfinite(got).all())
    assert bool((got[..., :pad] == 0).all())
    assert torch.allclose(got[..., pad:], alone, atol=1e-5)
