"""SnapKV's successors (AdaKV, PyramidKV, ChunkKV) against references written here from their papers' rules,
with Python sets and loops; the engine's exactness contracts for them are in test_compress.py."""

import math

import pytest
import torch
from tiny_models import tiny_model
from torch.nn import functional as F

import snapkv
from snapkv.analysis.speed.measure import kv_cache_bytes
from snapkv.core.cache import RaggedLayer
from snapkv.core.policies import PrefillView


def votes_per_query_head(query, keys, window):
    """(batch, heads, n - window) votes of the window, written out as the paper's Algorithm 1 (no pooling: the
    tests use kernel_size=1, since a max-pool makes neighbours tie and the order of ties is arbitrary)."""
    n = keys.shape[-2]
    weights = torch.matmul(query, keys.transpose(2, 3)) / math.sqrt(keys.shape[-1])
    causal = torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]
    return F.softmax(weights.masked_fill(~causal, float("-inf")), dim=-1)[..., :-window].sum(-2)


def view_of(query, keys):
    return PrefillView(query_window=query, keys=keys, padding_mask=None, scaling=keys.shape[-1] ** -0.5)


def adakv_reference(votes, k, alpha):
    """Ada-KV's allocation for one row: each head's safeguard share first, then the best votes of any head."""
    heads, prefix = votes.shape
    safe = int(alpha * k)
    kept = [set(votes[h].topk(safe).indices.tolist()) if safe else set() for h in range(heads)]
    rest = sorted(((votes[h, p].item(), h, p) for h in range(heads) for p in range(prefix) if p not in kept[h]),
                  reverse=True)
    for _, h, p in rest[: heads * k - heads * safe]:
        kept[h].add(p)
    return kept


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_adakv_shares_the_layer_budget_between_heads(alpha):
    torch.manual_seed(3)
    window, budget, n = 8, 40, 150
    query, keys = torch.randn(2, 4, window, 16), torch.randn(2, 4, n, 16) * 2
    policy = snapkv.AdaKV(window_size=window, max_capacity_prompt=budget, kernel_size=1, gqa="expand",
                          alpha_safeguard=alpha)
    kept = policy.kept_positions(view_of(query, keys), budget)
    votes = votes_per_query_head(query, keys, window)
    window_positions = set(range(n - window, n))
    counts = []
    for row in range(2):
        reference = adakv_reference(votes[row], budget - window, alpha)
        for head in range(4):
            got = kept[row, head]
            assert torch.equal(got[got >= 0], got[got >= 0].sort().values)  # ascending
            assert set(got[got >= 0].tolist()) == reference[head] | window_positions
            counts.append(int((got >= 0).sum()))
        assert int((kept[row] >= 0).sum()) == 4 * budget  # the layer's budget, shared
    if alpha < 1.0:
        assert len(set(counts)) > 1  # heads do keep different numbers of positions
    else:
        assert set(counts) == {budget}  # a full safeguard is SnapKV


def chunkkv_reference(votes, k, chunk_size):
    """ChunkKV for one row: chunks ranked by votes summed over heads and chunk; whole chunks until k positions,
    the last one cut to its best positions."""
    summed = votes.sum(0).tolist()
    chunks = [list(range(start, min(start + chunk_size, len(summed)))) for start in range(0, len(summed), chunk_size)]
    chunks.sort(key=lambda chunk: -sum(summed[p] for p in chunk))
    kept = set()
    for chunk in chunks:
        room = k - len(kept)
        kept |= set(sorted(chunk, key=lambda p: -summed[p])[:room])
        if len(kept) == k:
            return kept
    return kept


@pytest.mark.parametrize("chunk_size,budget", [(5, 40), (7, 41), (1, 30), (200, 30)])
def test_chunkkv_keeps_whole_chunks_for_every_head(chunk_size, budget):
    torch.manual_seed(chunk_size)
    window, n = 8, 131
    query, keys = torch.randn(2, 6, window, 16), torch.randn(2, 2, n, 16) * 2
    policy = snapkv.ChunkKV(window_size=window, max_capacity_prompt=budget, kernel_size=1, chunk_size=chunk_size)
    kept = policy.kept_positions(view_of(query, keys), budget)
    assert kept.shape == (2, 2, budget)
    votes = votes_per_query_head(query, keys.repeat_interleave(3, dim=1), window)
    for row in range(2):
        expected = chunkkv_reference(votes[row], budget - window, chunk_size) | set(range(n - window, n))
        for head in range(2):
            assert set(kept[row, head].tolist()) == expected


def pyramid_reference(budget, window, n, layers, beta=20):
    """PyramidKV's budgets as its reference code computes them (prefix slots, then the window added)."""
    k = budget - window
    min_num, max_num = k // beta, 2 * k - k // beta
    if max_num >= n - window:
        max_num, min_num = n - window, 2 * k - (n - window)
    steps = (max_num - min_num) // (layers - 1)
    return [max_num - layer * steps + window for layer in range(layers)]


@pytest.mark.parametrize("n", [400, 90])
def test_pyramidkv_is_snapkv_with_budgets_falling_with_depth(n):
    model = tiny_model("llama")  # 3 layers
    ids = torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(n))
    budgets = pyramid_reference(48, 8, n, 3, beta=4)
    assert budgets == sorted(budgets, reverse=True) and abs(sum(budgets) - 3 * 48) < 3
    kept = {}
    for policy in (snapkv.PyramidKV(window_size=8, max_capacity_prompt=48, kernel_size=3, beta=4),
                   snapkv.SnapKV(window_size=8, max_capacity_prompt=tuple(budgets), kernel_size=3)):
        with snapkv.compress(model, policy) as session:
            model.generate(ids, max_new_tokens=2, do_sample=False)
        kept[type(policy).__name__] = session.kept_positions
    for layer, positions in kept["SnapKV"].items():
        assert positions.shape[-1] == min(n, budgets[layer])
        assert torch.equal(kept["PyramidKV"][layer], positions)


def test_pyramidkv_counts_depth_over_compressed_layers_only():
    model = tiny_model("gemma3")  # sliding, global, sliding: one compressed layer keeps the whole budget
    ids = torch.randint(1, 128, (1, 90), generator=torch.Generator().manual_seed(0))
    with snapkv.compress(model, snapkv.PyramidKV(window_size=8, max_capacity_prompt=30, kernel_size=3)) as session:
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert list(session.kept_positions) == [1] and session.kept_positions[1].shape[-1] == 30


def test_adakv_cache_holds_each_heads_own_slots():
    model = tiny_model("llama")  # 2 kv heads, head_dim 16
    ids = torch.randint(1, 128, (2, 120), generator=torch.Generator().manual_seed(1))
    policy = snapkv.AdaKV(window_size=8, max_capacity_prompt=40, kernel_size=3, alpha_safeguard=0.0)
    with snapkv.compress(model, policy) as session:
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    uneven = 0
    for layer, kept in session.kept_positions.items():
        stored = cache.layers[layer]
        assert isinstance(stored, RaggedLayer)
        counts = (kept >= 0).sum(-1)
        uneven += int((counts != counts[:, :1]).any())
        assert stored.prompt_keys.shape == (int(counts.sum()), 16) == (2 * 2 * 40, 16)  # no padding stored
        assert stored.keys.shape[-2] == 3  # decoded tokens appended (the last one is never fed back)
    assert uneven, "every head kept the same number: the test shows nothing"
    per_slot = 2 * 16 * 4  # key + value, float32
    assert kv_cache_bytes(cache) == len(cache.layers) * (2 * 2 * 40 + 2 * 2 * 3) * per_slot


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(alpha_safeguard=1.5), ValueError, "alpha_safeguard"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(beta=0), ValueError, "beta"),
])
def test_successor_settings_are_checked(kwargs, error, match):
    kind = {"alpha_safeguard": snapkv.AdaKV, "chunk_size": snapkv.ChunkKV, "beta": snapkv.PyramidKV}[next(iter(kwargs))]
    with pytest.raises(error, match=match):
        kind(window_size=8, max_capacity_prompt=40, **kwargs)
    with pytest.raises(ValueError, match="expand"):
        snapkv.ChunkKV(gqa="expand")
    with pytest.raises(TypeError, match="one int"):
        snapkv.PyramidKV(max_capacity_prompt=(40, 50))


def test_ragged_layer_state_rebuilds_it():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    with snapkv.compress(model, snapkv.AdaKV(window_size=8, max_capacity_prompt=30, kernel_size=3)):
        cache = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True).past_key_values
    layer = cache.layers[0]
    rebuilt = RaggedLayer.from_state(*layer.state())
    assert rebuilt.get_seq_length() == layer.get_seq_length() and torch.equal(rebuilt.kept, layer.kept)
    new = torch.randn(1, 2, 1, 16)
    for a, b in zip(layer.update(new, new), rebuilt.update(new, new), strict=True):
        assert torch.equal(a, b)
