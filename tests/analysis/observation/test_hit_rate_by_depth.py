"""Hit rate on a relative depth axis across models: data shaping, figure and reading, on synthetic tables."""

import numpy as np
import pandas as pd

from snapkv.analysis.observation import hit_rate_by_depth, hit_rate_by_depth_figure, hit_rate_by_depth_reading


def observation_table(model: str, layers: int, snap_no_sinks: float, ref_no_sinks: float, samples: int = 3,
                      windows: int = 2) -> pd.DataFrame:
    """Notebook 01's columns: per (sample, layer, window, reference) counts out of 10 important entries."""
    rows = []
    for sample in range(samples):
        for layer in range(layers):
            for window in range(windows):
                for reference, free in (("snapkv", snap_no_sinks), ("random", ref_no_sinks), ("streaming", 0.0)):
                    hits_free = round(free * 6)
                    rows.append(dict(model=model, protocol="reference", sample=sample, layer=layer, window=window,
                                     reference=reference, hits=4 + hits_free, important=10, hits_no_sinks=hits_free,
                                     important_no_sinks=6, on_sinks=4, mass_recall=0.5, tokens=8))
    return pd.DataFrame(rows)


def test_depth_runs_from_0_to_1_with_each_models_own_layer_count():
    table = pd.concat([observation_table("a", 30, 1.0, 0.0), observation_table("b", 18, 1.0, 0.0)])
    summary = hit_rate_by_depth(table)
    for model, layers in (("a", 30), ("b", 18)):
        part = summary[(summary.model == model) & (summary.reference == "snapkv") & (summary.sinks == "with sinks")]
        assert (part.layers == layers).all() and len(part) == layers
        np.testing.assert_allclose(part.sort_values("layer").depth, np.arange(layers) / (layers - 1))
    snap = summary[(summary.reference == "snapkv")].set_index(["model", "sinks", "layer"])["mean"]
    assert snap[("a", "with sinks", 0)] == 1.0 and snap[("a", "without sinks", 0)] == 1.0
    streaming = summary[(summary.reference == "streaming") & (summary.sinks == "with sinks")]
    np.testing.assert_allclose(streaming["mean"], 0.4)  # the sinks only: 4 of 10
    assert set(summary.protocol) == {"reference"} and (summary.samples == 3).all()


def test_reading_says_what_holds_on_every_model_and_what_does_not():
    holds = pd.concat([observation_table("a", 6, 1.0, 0.0), observation_table("b", 4, 0.5, 0.0)])
    text = hit_rate_by_depth_reading(hit_rate_by_depth(holds))
    assert ("**Holds on every model:** SnapKV's sink-free hit rate is above the best reference set at every depth"
            in text)
    fails_on_b = pd.concat([observation_table("a", 6, 1.0, 0.0), observation_table("b", 4, 0.5, 0.5)])
    text = hit_rate_by_depth_reading(hit_rate_by_depth(fails_on_b))
    assert "**Does not hold on every model:** SnapKV's sink-free hit rate beats the best reference set at every " \
           "depth on a only" in text
    assert "- b, without sinks: SnapKV 0.50 averaged over 4 layers (best reference set 0.50); above the best " \
           "reference set at 0 of 4 depths" in text
    alone = hit_rate_by_depth_reading(hit_rate_by_depth(observation_table("a", 6, 1.0, 0.0)))
    assert "Only a has data" in alone


def test_figure_has_one_sorted_trace_per_model_set_and_panel():
    table = pd.concat([observation_table("a", 6, 1.0, 0.0), observation_table("b", 4, 0.5, 0.0)])
    summary = hit_rate_by_depth(table)
    figure, interactive = hit_rate_by_depth_figure(summary, "synthetic")
    assert len(figure.axes) == 2
    assert len(interactive.data) == 2 * 2 * 3  # panels x models x sets
    for trace in interactive.data:
        x = list(trace.x)
        assert x == sorted(x) and len(x) in (6, 4) and 0 <= min(x) and max(x) == 1
    names = {trace.name for trace in interactive.data}
    assert {"a, SnapKV", "b, random", "b, streaming"} <= names
    import matplotlib.pyplot as plt

    plt.close(figure)
