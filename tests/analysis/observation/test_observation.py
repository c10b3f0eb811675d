"""Observation experiments against direct computations from eager attention."""

import pytest
import torch
from reference import direct_hit_rate
from tiny_models import tiny_model

from snapkv.analysis.observation.attention import hit_rate_along_generation, voted_overlap, windows_along_prompt
from snapkv.core.compat import new_cache, prefill


def eager_attentions(model, ids):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


@pytest.fixture(params=["llama", "qwen3", pytest.param("smollm", marks=pytest.mark.slow)])
def model(request):
    if request.param == "smollm":
        return request.getfixturevalue("smollm")[0]
    return tiny_model(request.param)


def test_hit_rate_along_generation_matches_eager_attention(model):
    prompt_len, window, steps, k = 80, 8, 3, 8
    ids = torch.randint(1, 128, (1, prompt_len + steps * window), generator=torch.Generator().manual_seed(3))
    threshold = 0.011  # near-uniform attention of the tiny models sits around 1 / 100
    table = hit_rate_along_generation(model, ids, prompt_len, window_size=window, steps=steps, top_k=0.1,
                                      threshold=threshold)
    table = table[table.reference == "snapkv"]
    attentions = eager_attentions(model, ids)
    assert sorted(table.layer.unique()) == list(range(len(attentions)))
    assert 0 < table.hits.sum() < table.important.sum()  # the comparison below is not vacuous
    for row in table.itertuples():
        attn = attentions[row.layer]
        obs = attn[:, :, prompt_len - window : prompt_len, :prompt_len]
        start = prompt_len + row.window * window
        rows = attn[:, :, start : start + window, :prompt_len]
        assert (row.hits, row.important) == direct_hit_rate(obs, rows, window, k, threshold)
        voted = obs[..., : prompt_len - window].sum(2).topk(k, dim=-1).indices  # mass recall, from eager
        prefix = rows[..., : prompt_len - window]
        on_voted = prefix.gather(-1, voted[:, :, None, :].expand(-1, -1, rows.shape[2], -1)).sum(-1)
        assert row.mass_recall == pytest.approx((on_voted / prefix.sum(-1)).mean().item(), rel=1e-4)


def test_hit_rate_along_generation_after_a_cached_prefix_counts_the_same(model):
    # notebook 04 runs a document once for its questions at the end: the counts must not change
    prompt_len, window = 80, 8
    ids = torch.randint(1, 128, (1, prompt_len + 2 * window), generator=torch.Generator().manual_seed(4))
    cache = new_cache(model)
    with torch.no_grad():
        prefill(model, ids[:, :50], cache)
    settings = dict(window_size=window, steps=2, top_k=0.1, threshold=0.011)
    whole = hit_rate_along_generation(model, ids, prompt_len, **settings)
    continued = hit_rate_along_generation(model, ids, prompt_len, cache=cache, **settings)
    assert cache.get_seq_length() == 50  # continued on a copy
    counts = ["layer", "window", "reference", "hits", "important", "hits_no_sinks", "on_sinks"]
    assert 0 < whole.hits.sum() < whole.important.sum()
    assert whole[counts].equals(continued[counts])
    assert continued.mass_recall.to_numpy() == pytest.approx(whole.mass_recall.to_numpy(), rel=1e-4)


def test_hit_rate_along_generation_rejects_short_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="4 windows of 16 after a 40-token prompt need 104"):
        hit_rate_along_generation(model, torch.ones(1, 60, dtype=torch.long), 40, window_size=16)


def test_voted_overlap_is_one_for_identical_questions_and_matches_sets():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(5)
    document = torch.randint(1, 128, (1, 60), generator=gen)
    questions = [torch.randint(1, 128, (1, 12), generator=gen) for _ in range(2)]
    sequences = [torch.cat([document, q], 1) for q in questions + questions[:1]]
    table = voted_overlap(model, sequences, 60, window_size=12, top_k=6)
    assert set(table.pair) == {"0-1", "0-2", "1-2"}
    assert (table[table.reference.isin(["recency", "streaming"])].overlap == 1.0).all()  # they ignore the question
    table = table[table.reference == "snapkv"]
    assert (table[table.pair == "0-2"].overlap == 1.0).all()
    attentions = [eager_attentions(model, s) for s in sequences[:2]]
    for row in table[table.pair == "0-1"].itertuples():
        sets = [attn[row.layer][0, :, -12:, :60].sum(1).topk(6, dim=-1).indices for attn in attentions]
        shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(*sets))
        assert row.overlap == pytest.approx(shared / (6 * sets[0].shape[0]))
    with pytest.raises(ValueError, match="differ within their first 61 tokens"):
        voted_overlap(model, sequences, 61, window_size=11, top_k=6)


def test_windows_along_prompt_last_window_equals_the_observation_hit_rate():
    model = tiny_model("qwen3")
    prompt_len, window = 64, 8
    ids = torch.randint(1, 128, (1, prompt_len + 16), generator=torch.Generator().manual_seed(9))
    table = windows_along_prompt(model, ids, prompt_len, window_size=window, n_windows=5, top_k=0.1,
                                 threshold=0.014)
    assert sorted(table.prompt_window.unique()) == [-5, -4, -3, -2, -1]
    table = table[table.reference == "snapkv"]
    assert 0 < table.hits.sum() < table.important.sum()
    attentions = eager_attentions(model, ids)
    for row in table.itertuples():
        end = prompt_len - (-row.prompt_window - 1) * window
        attn = attentions[row.layer]
        obs = attn[:, :, end - window : end, :end]
        rows = attn[:, :, prompt_len:, :end]
        assert (row.hits, row.important) == direct_hit_rate(obs, rows, window, 6, 0.014)
