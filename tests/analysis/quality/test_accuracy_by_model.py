"""Accuracy against budget per method across models: data shaping, figure and reading, on synthetic tables."""

import numpy as np
import pandas as pd
import pytest

from snapkv.analysis import quality
from snapkv.analysis.quality.plots import accuracy_by_model_figure


def quality_table(model: str, scores: dict, tasks=("needle",), prompts: int = 4, mode="question-aware"):
    """Notebook 06/07's columns: scores maps (method, budget or None) to the score every prompt gets."""
    rows = []
    for task in tasks:
        for sample in range(prompts):
            for (method, budget), score in scores.items():
                rows.append(dict(model=model, task=task, length=512, sample=sample, depth=0.5, mode=mode,
                                 method=method, budget=budget, score=score, correct=score == 1.0))
    return pd.DataFrame(rows)


GOOD = {("full", None): 1.0, ("snapkv", 128): 0.75, ("snapkv", 256): 1.0, ("streaming", 128): 0.25,
        ("streaming", 256): 0.5, ("random", 128): 0.0, ("random", 256): 0.25}


def test_accuracy_by_model_keeps_the_full_cache_without_budget_and_the_models_order():
    table = pd.concat([quality_table("z-model", GOOD), quality_table("a-model", GOOD),
                       quality_table("z-model", GOOD, mode="question-agnostic")])
    summary = quality.accuracy_by_model(table)
    assert list(dict.fromkeys(summary.model)) == ["z-model", "a-model"]
    assert set(summary["mode"]) == {"question-aware"} and set(summary.over) == {"prompts"}
    full = summary[summary.method == "full"]
    assert full.budget.isna().all() and (full["mean"] == 1.0).all() and (full.samples == 4).all()
    snap = summary[(summary.method == "snapkv") & (summary.model == "a-model")].set_index("budget")["mean"]
    assert snap.to_dict() == {128: 0.75, 256: 1.0}


def test_a_suite_is_the_unweighted_mean_over_tasks():
    one = quality_table("m", {("full", None): 1.0, ("snapkv", 128): 1.0}, tasks=("single_key",), prompts=3)
    two = quality_table("m", {("full", None): 1.0, ("snapkv", 128): 0.0}, tasks=("multi_key",), prompts=1)
    summary = quality.accuracy_by_model(pd.concat([one, two]))
    snap = summary[summary.method == "snapkv"].iloc[0]
    assert snap["mean"] == pytest.approx(0.5) and snap.samples == 2 and snap.over == "tasks"


def test_reading_compares_snapkv_with_the_baselines_on_every_model():
    worse = dict(GOOD) | {("snapkv", 256): 0.25}  # below streaming at 256 on the second model
    summary = quality.accuracy_by_model(pd.concat([quality_table("a", GOOD), quality_table("b", worse)]))
    text = quality.accuracy_by_model_reading(summary, "needle")
    assert ("- a: full cache 1.00; SnapKV @ 256 1.00 (100% of the full cache); at or above streaming at every "
            "budget") in text
    assert "at or above streaming at 1 of 2 budgets (below at 256)" in text
    assert "**Holds on every model:** SnapKV is at or above random at every budget." in text
    assert "**Does not hold on every model:** SnapKV is at or above streaming at every budget on a." in text
    assert "; best compressing method: snapkv 0.75 @ 128, streaming 0.50 @ 256." in text  # b: streaming leads at 256
    assert "is the best compressing method at every budget" not in text
    same = quality.accuracy_by_model(pd.concat([quality_table("a", GOOD), quality_table("b", GOOD)]))
    assert ("**Holds on every model:** snapkv is the best compressing method at every budget."
            in quality.accuracy_by_model_reading(same, "needle"))
    tied = quality.accuracy_by_model(pd.concat([quality_table(m, GOOD | {("streaming", 256): 1.0}) for m in "ab"]))
    text = quality.accuracy_by_model_reading(tied, "needle")  # a tie names every leader, not the first in order
    assert "; best compressing method: snapkv 0.75 @ 128, snapkv = streaming 1.00 @ 256." in text
    assert ("**Holds on every model:** snapkv is the best compressing method at every budget (tied at some budgets)."
            in text)
    low_full = quality_table("b", GOOD | {("full", None): 0.5})
    text = quality.accuracy_by_model_reading(quality.accuracy_by_model(pd.concat([quality_table("a", GOOD), low_full])),
                                             "needle")
    assert "The full caches differ (a 1.00, b 0.50)" in text
    assert "nothing to compare" in quality.accuracy_by_model_reading(
        quality.accuracy_by_model(quality_table("a", GOOD)), "needle")


def test_figure_draws_one_panel_per_model_and_the_full_cache_across_the_budgets():
    summary = quality.accuracy_by_model(pd.concat([quality_table("a", GOOD), quality_table("b", GOOD)]))
    figure, interactive = accuracy_by_model_figure(summary, "synthetic")
    assert len(figure.axes) == 2
    names = [trace.name for trace in interactive.data]
    assert names == ["full cache", "snapkv", "random", "streaming"] * 2
    for trace in interactive.data:
        assert [row[0] for row in trace.customdata] == [128.0, 256.0]  # the hover shows the budget itself
        shift = np.asarray(trace.x) / [128.0, 256.0]  # drawn a little beside it, the same factor at each budget
        assert shift == pytest.approx([shift[0]] * 2) and 0.9 < shift[0] < 1.1
        if trace.name == "full cache":
            assert list(trace.y) == [1.0, 1.0] and trace.line.dash == "dash" and shift[0] == 1.0
    first = [trace.x[0] for trace in interactive.data[1:4]]  # equal scores must not hide each other
    assert len(set(first)) == 3 and len({trace.marker.symbol for trace in interactive.data[1:4]}) == 3
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_method_colours_are_distinct_and_never_the_full_caches_grey():
    from snapkv.analysis.quality.plots import METHOD_ORDER, _colors

    methods = [m for m in METHOD_ORDER if m != "full"] + ["custom-a", "custom-b"]
    colours = _colors(methods)
    assert len(set(colours.values())) == len(methods)
    assert all(len({round(channel, 3) for channel in colour}) > 1 for colour in colours.values())  # no grey
