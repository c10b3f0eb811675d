"""Hit-rate metrics against a direct set computation."""

import itertools

import pandas as pd
import pytest
import torch
from reference import direct_hit_rate

from snapkv.analysis.observation.metrics import (
    hit_rate_table,
    important_positions,
    pool,
    reference_set,
    sink_positions,
    summarize,
    token_metrics,
    voted_set,
)


def test_hit_rate_table_matches_direct_sets():
    torch.manual_seed(0)
    prompt_len, window = 80, 8
    obs = {layer: torch.rand(2, 3, window, prompt_len).softmax(-1) for layer in range(2)}
    gen = {layer: (torch.rand(2, 3, 12, prompt_len) * 6).softmax(-1) for layer in range(2)}
    table = hit_rate_table(obs, gen, window_size=window, generation_window=4, top_k=0.1, threshold=0.02)
    assert set(table.reference) == {"snapkv", "random", "recency", "streaming"}
    table = table[table.reference == "snapkv"]
    assert len(table) == 2 * 3
    for row in table.itertuples():
        part = slice(row.window * 4, row.window * 4 + 4)
        hits, important = direct_hit_rate(obs[row.layer], gen[row.layer][:, :, part], window, 8, 0.02)
        assert (row.hits, row.important) == (hits, important) and important > 0
        assert row.hit_rate == pytest.approx(hits / important)


def test_every_reference_counts_its_own_set():
    # all references share one product: each must still count hits against its own set (random: seed mean)
    torch.manual_seed(3)
    prompt_len, window, k = 70, 7, 9
    obs = {0: torch.rand(1, 3, window, prompt_len).softmax(-1)}
    rows = (torch.rand(1, 3, 10, prompt_len) * 6).softmax(-1)
    table = hit_rate_table(obs, {0: rows}, window_size=window, generation_window=10, top_k=k, threshold=0.02,
                           seeds=2).set_index("reference")
    important = rows > 0.02
    important[..., prompt_len - window :] = False

    def hits(chosen):
        return float((important & chosen[:, :, None, :]).sum())

    shape = (1, 3, prompt_len)
    expected = {"snapkv": hits(voted_set(obs[0], k)),
                "random": sum(hits(reference_set("random", shape, window, k, seed=s)) for s in range(2)) / 2,
                "recency": hits(reference_set("recency", shape, window, k)),
                "streaming": hits(reference_set("streaming", shape, window, k))}
    assert len(set(expected.values())) == 4  # the sets differ, so a mix-up would show
    for reference, value in expected.items():
        assert table.loc[reference, "hits"] == pytest.approx(value)
        assert table.loc[reference, "important"] == float(important.sum())


def test_voted_set_size_and_errors():
    obs = torch.rand(1, 2, 4, 100)
    assert voted_set(obs, 0.05).sum(-1).tolist() == [[5, 5]]
    assert not voted_set(obs, 10)[..., 96:].any()  # never inside the observation window
    with pytest.raises(ValueError, match="top_k gives 0 positions"):
        voted_set(obs, 0.001)


def test_summarize_gives_mean_and_bootstrap_interval():
    table = pd.DataFrame(dict(layer=[0] * 5 + [1] * 5, sample=list(range(5)) * 2,
                              hit_rate=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0]))
    summary = summarize(table, ["layer"], "hit_rate").set_index("layer")
    assert summary.loc[0, "mean"] == pytest.approx(0.7)
    assert 0.5 <= summary.loc[0, "ci_low"] < 0.7 < summary.loc[0, "ci_high"] <= 0.9
    assert summary.loc[1, ["ci_low", "ci_high"]].tolist() == [1.0, 1.0] and summary.loc[1, "samples"] == 5


@pytest.mark.parametrize("kind", ["random", "recency", "streaming"])
def test_reference_sets_have_the_size_and_avoid_the_window(kind):
    chosen = reference_set(kind, (2, 3, 100), window=10, k=12, sink_size=4, seed=1)
    assert (chosen.sum(-1) == 12).all()
    assert not chosen[..., 90:].any()
    if kind == "recency":
        assert chosen[..., 78:90].all()
    if kind == "streaming":
        assert chosen[..., :4].all() and chosen[..., 82:90].all()


def test_random_reference_is_reproducible_with_its_seed():
    a, b = (reference_set("random", (1, 4, 200), 16, 20, seed=3) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, reference_set("random", (1, 4, 200), 16, 20, seed=4))


def test_sink_exclusion_removes_exactly_the_sinks():
    torch.manual_seed(1)
    prompt_len, window = 60, 6
    obs = {0: torch.rand(1, 2, window, prompt_len).softmax(-1)}
    rows = (torch.rand(1, 2, 8, prompt_len) * 5).softmax(-1)
    rows[..., :4] += 0.3  # make the sinks important
    table = hit_rate_table(obs, {0: rows}, window_size=window, generation_window=8, top_k=6, threshold=0.02,
                           sink_size=4).set_index("reference")
    kept = rows.clone()
    kept[..., :4] = 0  # no sink can be important any more
    hits, important = direct_hit_rate(obs[0], kept, window, 6, 0.02)
    assert table.loc["snapkv", "hit_rate_no_sinks"] == pytest.approx(hits / important)
    all_hits, all_important = direct_hit_rate(obs[0], rows, window, 6, 0.02)
    assert table.loc["snapkv", "sink_share"] == pytest.approx((all_important - important) / all_important)
    cutoff = sink_positions(obs[0], sink_size=2, cutoff=0.03)
    mean = obs[0][..., : prompt_len - window].mean(-2)
    assert torch.equal(cutoff[..., 2 : prompt_len - window], mean[..., 2:] > 0.03) and cutoff[..., :2].all()


def test_mass_recall_is_one_for_the_whole_prefix_and_a_share_otherwise():
    torch.manual_seed(2)
    prompt_len, window = 40, 5
    obs = {0: torch.rand(1, 2, window, prompt_len).softmax(-1)}
    rows = (torch.rand(1, 2, 6, prompt_len) * 4).softmax(-1)
    whole = hit_rate_table(obs, {0: rows}, window_size=window, generation_window=6, top_k=prompt_len - window,
                           references=())
    assert whole.mass_recall.item() == pytest.approx(1.0)
    part = hit_rate_table(obs, {0: rows}, window_size=window, generation_window=6, top_k=7, references=())
    voted = voted_set(obs[0], 7)
    prefix = rows[..., : prompt_len - window]
    direct = ((prefix * voted[:, :, None, : prompt_len - window]).sum(-1) / prefix.sum(-1)).mean()
    assert part.mass_recall.item() == pytest.approx(direct.item()) and part.mass_recall.item() < 1


def test_pool_recomputes_ratios_from_counts():
    torch.manual_seed(3)
    obs = {0: torch.rand(1, 2, 4, 50).softmax(-1)}
    rows = (torch.rand(1, 2, 12, 50) * 5).softmax(-1)
    by_window = hit_rate_table(obs, {0: rows}, window_size=4, generation_window=4, top_k=5, threshold=0.03)
    whole = hit_rate_table(obs, {0: rows}, window_size=4, generation_window=12, top_k=5, threshold=0.03)
    pooled = pool(by_window, ["layer", "reference"]).set_index("reference")
    whole = whole.set_index("reference")
    for column in ("hits", "important", "hit_rate", "hit_rate_no_sinks", "sink_share", "mass_recall", "tokens"):
        assert pooled[column].to_numpy() == pytest.approx(whole.loc[pooled.index, column].to_numpy())


@pytest.mark.parametrize("sizes", [(5, 5), (3, 8)])  # equal sizes (gathered masses) and unequal (a product)
def test_token_metrics_equal_loops_over_tokens_and_positions(sizes):
    # also with the important positions of longer rows, as windows_along_prompt passes them
    torch.manual_seed(4)
    prompt_len, window, longer = 30, 4, 37
    full = (torch.rand(1, 2, 5, longer) * 6).softmax(-1)
    rows = full[..., :prompt_len]
    sets = {"a": [torch.zeros(1, 2, prompt_len, dtype=torch.bool) for _ in range(2)]}
    for candidate, size in zip(sets["a"], sizes):
        candidate.scatter_(-1, torch.rand(1, 2, prompt_len - window).topk(size, -1).indices, True)
    sinks = torch.zeros(1, 2, prompt_len, dtype=torch.bool)
    sinks[..., :3] = True
    for important in (None, important_positions(full, 0.04)):
        totals = token_metrics(rows, sets, sinks, window, 0.04, important)["a"]
        for head, token in itertools.product(range(2), range(5)):
            above = [p for p in range(prompt_len - window) if rows[0, head, token, p] > 0.04]
            per_set = [[p for p in above if chosen[0, head, p]] for chosen in sets["a"]]
            assert totals["important"][0, head, token] == len(above) > 0
            assert totals["on_sinks"][0, head, token] == sum(p < 3 for p in above)
            assert totals["important_no_sinks"][0, head, token] == sum(p >= 3 for p in above)
            assert totals["hits"][0, head, token] == sum(map(len, per_set)) / 2
            assert totals["hits_no_sinks"][0, head, token] == sum(p >= 3 for hits in per_set for p in hits) / 2
            masses = [float(rows[0, head, token][chosen[0, head]].sum()) for chosen in sets["a"]]
            assert totals["voted_mass"][0, head, token] == pytest.approx(sum(masses) / 2, rel=1e-5)
            assert totals["prefix_mass"][0, head, token] == pytest.approx(float(rows[0, head, token, :26].sum()))
