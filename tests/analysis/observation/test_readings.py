"""The observation notebooks' readings: verdicts and text from small hand-made tables."""

import pandas as pd
import pytest

from snapkv.analysis.observation import readings


def counts(hit_rate: float, **tags) -> dict:
    """A row of an observation table whose hit rate is `hit_rate` (100 important entries, 10 on sinks)."""
    return dict(tags, hits=100 * hit_rate, important=100, hits_no_sinks=90 * hit_rate, important_no_sinks=90,
                on_sinks=10, tokens=10, mass_recall=hit_rate)


def interval(mean: float, low: float, high: float) -> pd.Series:
    return pd.Series(dict(mean=mean, ci_low=low, ci_high=high))


@pytest.mark.parametrize("last, earliest, verdict", [
    (interval(0.8, 0.7, 0.9), interval(0.5, 0.4, 0.6), "the last window predicts better"),
    (interval(0.5, 0.4, 0.6), interval(0.8, 0.7, 0.9), "the earliest window predicts better"),
    (interval(0.7, 0.6, 0.8), interval(0.65, 0.55, 0.75), "no clear difference (the intervals overlap)"),
    (interval(0.7, 0.6, 0.8), interval(0.5, 0.4, 0.6), "no clear difference (the intervals overlap)"),  # touching
])
def test_interval_verdict_needs_disjoint_intervals(last, earliest, verdict):
    assert readings.interval_verdict(last, earliest) == verdict


def test_last_vs_earliest_names_the_earliest_window_and_compares_over_samples():
    def table(last_rates, earliest_rates):
        return pd.DataFrame([dict(reference="snapkv", prompt_window=w, sample=s, hit_rate=r)
                             for w, rates in ((-1, last_rates), (-3, earliest_rates)) for s, r in enumerate(rates)]
                            + [dict(reference="random", prompt_window=-1, sample=0, hit_rate=0.0)])

    text = readings.last_vs_earliest(table([0.9, 0.92, 0.94], [0.1, 0.12, 0.14]), "hit_rate")
    assert text.startswith("0.92 [") and "at -3: the last window predicts better" in text
    text = readings.last_vs_earliest(table([0.5, 0.9, 0.1], [0.4, 0.8, 0.2]), "hit_rate")
    assert text.endswith("no clear difference (the intervals overlap)")


@pytest.mark.parametrize("hit_rate, first, last, high", [
    (0.8, 0.8, 0.85, True), (0.5, 0.5, 0.55, True), (0.49, 0.5, 0.5, False), (0.8, 0.9, 0.75, False)])
def test_hit_rate_verdict_asks_high_and_stable(hit_rate, first, last, high):
    verdict = readings.hit_rate_verdict(hit_rate, first, last)
    assert verdict.startswith("high and stable") == high
    assert verdict.startswith("not the high") != high


def test_hit_rate_reading_uses_the_first_and_last_window_and_the_first_protocol():
    rows = []
    for protocol, rates in (("reference", (0.9, 0.85, 0.8)), ("greedy", (0.3, 0.3, 0.3))):
        rows += [counts(rate, protocol=protocol, sample=0, layer=0, window=w, reference="snapkv")
                 for w, rate in enumerate(rates)]
        rows += [counts(0.2, protocol=protocol, sample=0, layer=0, window=0, reference=name)
                 for name in ("random", "recency")]
    text = readings.hit_rate_reading(pd.DataFrame(rows), ("reference", "greedy"), "tiny", 1)
    assert text.startswith("On tiny (n = 1 samples")
    assert "**reference**: SnapKV hit rate 0.85 [0.85, 0.85] (first window 0.90, last 0.80)" in text
    assert "**greedy**: SnapKV hit rate 0.30" in text
    assert "The headline hit rate is high and stable" in text
    text = readings.hit_rate_reading(pd.DataFrame(rows), ("greedy", "reference"), "tiny", 1)
    assert "The headline hit rate is not the high, stable curve" in text


def test_windows_along_prompt_reading_covers_every_layer_span():
    rows = [counts(rate, sample=s, prompt_window=w, layers=span, reference=reference)
            for s in range(3) for span in ("layers 0-1", "layers 2-3")
            for w, reference, rate in ((-1, "snapkv", 0.9 + s / 100), (-2, "snapkv", 0.2 + s / 100),
                                       (-1, "random", 0.1), (-2, "random", 0.1), (-1, "recency", 0.3),
                                       (-2, "recency", 0.3))]
    text = readings.windows_along_prompt_reading(pd.DataFrame(rows), 3)
    assert text.count("at -2: the last window predicts better") == 6  # all, 2 spans; with and without sinks
    assert "- layers 0-1:" in text and "- layers 2-3:" in text
    assert "At window -1 the best reference set (recency) scores 0.30 (SnapKV 0.91)" in text


@pytest.mark.parametrize("early, late, falls", [(0.6, 0.3, True), (0.3, 0.6, False), (0.4, 0.4, False)])
def test_question_overlap_reading_says_whether_overlap_falls_with_depth(early, late, falls):
    summary = pd.DataFrame([dict(reference="snapkv", layer=layer, mean=early if layer < 2 else late)
                            for layer in range(4)]
                           + [dict(reference="random", layer=layer, mean=0.05) for layer in range(4)])
    text = readings.question_overlap_reading(summary, chance=0.05, num_layers=4)
    assert f"{early:.0%} in the first half of the layers and {late:.0%} in the second" in text
    assert ("As the paper reports, overlap falls with depth" in text) == falls
    assert ("Unlike the paper, overlap does not fall with depth" in text) == (not falls)


@pytest.mark.parametrize("end_rate, high", [(0.7, True), (0.5, True), (0.45, False)])
def test_question_position_reading_needs_both_placements_high(end_rate, high):
    rows = [counts(rate, placement=placement, reference=reference)
            for placement, snap in (("beginning", 0.8), ("end", end_rate))
            for reference, rate in (("snapkv", snap), ("random", 0.1), ("streaming", 0.2))]
    text = readings.question_position_reading(pd.DataFrame(rows))
    assert "question at the **beginning**: SnapKV hit rate 0.80, best reference (streaming) 0.20" in text
    assert text.endswith("both placements stay high.") == high
    assert text.endswith("at least one placement stays below 0.5 on this model.") == (not high)


def test_voting_variants_reading_lists_settings_in_order_and_the_worst_heads():
    summary = pd.DataFrame(
        [dict(setting="window_size", value=v, layer=0, mean=m) for v, m in (("32", 0.7), ("8", 0.5))]
        + [dict(setting="kernel_size", value="1", layer=0, mean=0.7)]
        + [dict(setting="gqa", value=g, layer=0, mean=m) for g, m in (("expand", 0.7), ("mean", 0.6), ("max", 0.5))])
    heads = pd.DataFrame([dict(layer=0, head=0, hits=9, important=10), dict(layer=0, head=1, hits=2, important=10),
                          dict(layer=1, head=0, hits=0, important=0)])  # no important entry: no hit rate
    text = readings.voting_variants_reading(summary, heads, (8, 32))
    assert "observation window: 8: 0.50, 32: 0.70." in text  # in the order asked, not sorted as strings
    assert "costs 0.10 against one set per query head" in text
    assert "Least predictable heads: L0H1 (0.20), L0H0 (0.90); the median head scores 0.55 (2 heads" in text


def test_hit_rate_reading_gives_an_interval_over_the_samples():
    rows = [counts(rate, protocol="reference", sample=s, layer=0, window=0, reference=name)
            for s, rate in enumerate((0.6, 0.8, 1.0)) for name in ("snapkv", "random")]
    text = readings.hit_rate_reading(pd.DataFrame(rows), ("reference",), "tiny", 3)
    low, high = (float(x) for x in text.split("SnapKV hit rate 0.80 [")[1].split("]")[0].split(", "))
    assert 0.6 <= low < 0.8 < high <= 1.0
