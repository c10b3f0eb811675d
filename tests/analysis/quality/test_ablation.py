"""The pooling ablation that `snapkv needle` and notebook 06 share."""

import pandas as pd

from snapkv.analysis.quality.ablation import pooling_ablation


def quality_table(methods_budgets, modes=("question-aware",)) -> pd.DataFrame:
    return pd.DataFrame([dict(mode=mode, method=method, budget=budget, length=512, depth=0.5, sample=0,
                              score=score, correct=score == 1.0, prefix_score=score, task="needle")
                         for mode in modes for (method, budget), score in methods_budgets.items()])


def test_pooling_ablation_keeps_snapkv_variants_at_the_ablation_budgets():
    table = quality_table({("full", None): 1.0, ("snapkv", 128): 1.0, ("snapkv", 256): 1.0,
                           ("snapkv-avgpool", 128): 0.0, ("snapkv-nopool", 128): 0.0, ("streaming", 128): 0.0},
                          modes=("question-aware", "question-agnostic"))
    rows, summary = pooling_ablation(table, (128,), "question-aware")
    assert set(zip(rows.method, rows.pooling)) == {("snapkv", "maxpool"), ("snapkv-avgpool", "avgpool"),
                                                   ("snapkv-nopool", "none")}
    assert (rows.budget == 128).all() and len(rows) == 6  # both modes in the rows
    assert set(summary.pooling) == {"maxpool", "avgpool", "none"}


def test_pooling_ablation_needs_two_poolings():
    only_maxpool = quality_table({("full", None): 1.0, ("snapkv", 128): 1.0})
    assert pooling_ablation(only_maxpool, (128,), "question-aware") is None
    other_budget = quality_table({("snapkv", 128): 1.0, ("snapkv-avgpool", 64): 1.0})
    assert pooling_ablation(other_budget, (128,), "question-aware") is None
