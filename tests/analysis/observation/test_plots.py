"""The line figures' plotly version plots each series at its own x values (the PNG and the HTML show the same
data), whatever the order of the summary's rows."""

import numpy as np
import pandas as pd

from snapkv.analysis.observation import plots


def shuffled_summary(seed=0):
    rng = np.random.default_rng(seed)
    rows = [dict(protocol=protocol, series=series, layer=layer, mean=value, ci_low=value - 0.05, ci_high=value + 0.05)
            for protocol in ("reference", "greedy")
            for series in ("SnapKV, tokens 1-16", "SnapKV, tokens 17-32", "random", "recency", "streaming")
            for layer, value in enumerate(rng.uniform(0.1, 0.9, 12))]
    return pd.DataFrame(rows).sample(frac=1, random_state=seed)


def test_each_plotly_series_has_its_own_rows_in_layer_order():
    summary = shuffled_summary()
    _, interactive = plots.hit_rate_along_generation_figure(summary, "caption")
    expected = summary.set_index(["protocol", "series", "layer"])
    protocol_of_axis = {"x": "greedy", "x2": "reference"}  # panels in sorted order
    assert len(interactive.data) == 2 * 5
    for trace in interactive.data:
        rows = expected.loc[[(protocol_of_axis[trace.xaxis], trace.name, layer) for layer in trace.x]]
        assert list(trace.x) == list(range(12)), trace.name
        np.testing.assert_allclose(trace.y, rows["mean"])
        np.testing.assert_allclose(trace.error_y.array, rows.ci_high - rows["mean"])
        np.testing.assert_allclose(trace.error_y.arrayminus, rows["mean"] - rows.ci_low)
    assert list(interactive.layout.yaxis.range) == [0, 1.02]


def test_reference_sets_are_told_apart_by_dash_and_marker():
    summary = shuffled_summary()
    summary = summary[summary.protocol == "reference"].assign(reference=lambda d: d.series)
    _, interactive = plots.question_overlap_figure(summary.drop(columns="protocol"), chance=0.05, caption="c")
    styles = {t.name: (t.line.dash, t.marker.symbol) for t in interactive.data}
    assert len({styles[name] for name in ("random", "recency", "streaming")}) == 3
    assert interactive.layout.shapes  # the chance line
