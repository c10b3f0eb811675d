"""The question-agnostic leaderboard (notebook 14): budgets from the fraction removed, relative accuracy on the
prompts the full cache answers, the reading's verdicts, the figure, and settings refused before any work."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from snapkv.analysis.quality import leaderboard as lb


def rows(scores: dict, full: list, experiment="needle", mode="question-agnostic", length=1000) -> pd.DataFrame:
    """evaluate-like rows: scores {(method, fraction): [score per prompt]}, full [score per prompt]."""
    base = dict(experiment=experiment, task="needle", length=length, sample=0, mode=mode)
    records = [dict(base, depth=float(i), method="full", budget=pd.NA, removed=np.nan, score=s)
               for i, s in enumerate(full)]
    records += [dict(base, depth=float(i), method=method, budget=lb.budget_of(length, fraction), removed=fraction,
                     score=s) for (method, fraction), values in scores.items() for i, s in enumerate(values)]
    table = pd.DataFrame(records)
    return table.astype({"budget": "Int64"})


def test_budgets_remove_the_fraction_of_the_prompt():
    assert [lb.budget_of(1000, f) for f in lb.FRACTIONS] == [750, 500, 250, 125]
    grid, removed = lb.fraction_methods(("snapkv", "knorm"), (0.5, 0.75), 1000, window_size=16, kernel_size=5)
    assert [(m.name, m.budget) for m in grid] == [("full", None), ("snapkv", 500), ("knorm", 500), ("snapkv", 250),
                                                   ("knorm", 250)]
    assert removed == {500: 0.5, 250: 0.75} and grid[1].policy.max_capacity_prompt == 500


def test_relative_accuracy_counts_only_the_prompts_the_full_cache_answers():
    table = lb.leaderboard_table(rows({("snapkv", 0.5): [1, 0, 1, 1], ("knorm", 0.5): [1, 1, 0, 0]},
                                      full=[1, 1, 0, 1]))
    got = table.set_index("method")
    assert got.retention["snapkv"] == pytest.approx(2 / 3) and got.retention["knorm"] == pytest.approx(2 / 3)
    assert (got.prompts == 3).all() and (got.removed == 0.5).all()  # prompt 2 (unanswered) is left out
    assert got.ci_low["snapkv"] <= got.retention["snapkv"] <= got.ci_high["snapkv"]


def test_the_reading_names_the_best_method_and_what_whole_units_change():
    needle = rows({("snapkv", 0.5): [1, 1, 0, 0], ("snapkv", 0.75): [0, 0, 0, 0], ("knorm", 0.5): [1, 1, 1, 0],
                   ("knorm", 0.75): [1, 0, 0, 0], ("knorm+span", 0.5): [1, 1, 1, 1],
                   ("knorm+span", 0.75): [1, 1, 1, 1]},
                  full=[1, 1, 1, 1])
    aware = rows({("snapkv", 0.5): [1, 1, 1, 1], ("snapkv", 0.75): [1, 1, 1, 1], ("knorm", 0.5): [0, 0, 0, 0],
                  ("knorm", 0.75): [0, 0, 0, 0]}, full=[1, 1, 1, 1], mode="question-aware")
    tiny = rows({("knorm+span", 0.5): [1, 1, 1, 0]}, full=[1, 1, 1, 1]).assign(experiment=lb.TINY, removed=np.nan,
                                                                               budget=32)
    table = lb.leaderboard_table(pd.concat([needle, aware, tiny], ignore_index=True))
    text = lb.leaderboard_reading(table)
    assert ("**needle, question-agnostic** (n = 4): best knorm+span (1.00 of the full cache, mean over the "
            "fractions); without whole-unit keeping the best is knorm (0.50)") in text
    assert "at 75% removed, >= 90% of the full cache: knorm+span 1.00" in text
    assert "whole units against the plain score: knorm+span +0.50" in text
    assert "**needle, question-aware** (n = 4): best snapkv (1.00" in text and "does not change the best" in text
    assert "at 75% removed, >= 90% of the full cache: snapkv 1.00" in text
    assert "**Tiny budget** (32 prompt tokens kept, its window included, question-agnostic, n = 4" in text
    assert "knorm+span 0.75" in text
    tied = lb.leaderboard_reading(lb.leaderboard_table(rows({("snapkv", 0.5): [1, 0], ("knorm", 0.5): [0, 1]},
                                                            full=[1, 1])))
    assert "best knorm = snapkv (0.50" in tied and "does not change the best" in tied
    nothing = lb.leaderboard_reading(lb.leaderboard_table(rows({("snapkv", 0.5): [0, 0]}, full=[1, 1])))
    assert "no method answers any prompt at any fraction" in nothing
    figure, interactive = lb.leaderboard_figure(table, "tiny")
    assert len(figure.axes) == 2  # one experiment x two modes (the tiny-budget rows are not drawn)
    assert {t.name for t in interactive.data} == {"snapkv", "knorm", "knorm+span"}


@pytest.mark.parametrize(("change", "message"), [
    (dict(methods=("full", "snapkv")), "the full cache is always run"),
    (dict(methods=("nope",)), "unknown method"),
    (dict(fractions=(0.5, 1.0)), "fractions must lie in"),
    (dict(modes=("sideways",)), "modes must be some of"),
    (dict(needle_lengths=(100,), fractions=(0.9,)), "leaves 10 tokens"),
    (dict(tiny_budget=4, tiny_window_size=4), "budget 4 must exceed the observation window"),
])
def test_bad_settings_are_refused_before_any_work(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(lb.LeaderboardSettings(), **change)
