"""The pooling ablation (the paper's needle figure): SnapKV with maxpool, avgpool and no pooling at the
ablation budgets, from a quality table; `snapkv needle` and notebook 06 both use it."""

import pandas as pd

from snapkv.analysis.quality.methods import POOLING
from snapkv.analysis.quality.statistics import summarize_quality


def pooling_ablation(table: pd.DataFrame, ablation_budgets, mode: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(rows, summary): the SnapKV rows at `ablation_budgets` with their `pooling`, and their accuracy per
    pooling and length in `mode`; None when fewer than two poolings ran (nothing to compare)."""
    rows = table[table.method.isin(POOLING) & table.budget.isin(ablation_budgets)]
    if rows.method.nunique() < 2:
        return None
    rows = rows.assign(pooling=rows.method.map(POOLING))
    return rows, summarize_quality(rows[rows["mode"] == mode], ["pooling", "length"])
