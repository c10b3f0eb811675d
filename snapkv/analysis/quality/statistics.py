"""Statistics over quality tables: calibration to what the full cache solves, retention relative to the full
cache (paired bootstrap), summaries, suite means and the targets."""

import numpy as np
import pandas as pd

from snapkv.analysis.observation.metrics import summarize
from snapkv.analysis.quality.methods import CALIBRATED, CALIBRATION_THRESHOLD, SNAPKV_FAMILY


def calibrate(table: pd.DataFrame, threshold: float = CALIBRATION_THRESHOLD, by=("task", "length"),
              mode: str | None = None) -> pd.DataFrame:
    """Which (task, length) groups the full cache solves: one row per group with full_score (mean score of the
    full cache), samples, kept (full_score >= threshold) and reason."""
    full = table[table.method == "full"]
    if mode is not None:
        full = full[full["mode"] == mode]
    if full.empty:
        raise ValueError("the table has no full-cache rows to calibrate on")
    records = []
    for key, group in full.groupby(list(by), sort=True):
        score = float(group.score.mean())
        kept = score >= threshold
        reason = (f"kept: full cache scores {score:.2f} >= {threshold} on {len(group)} prompts" if kept else
                  f"dropped: full cache scores {score:.2f} < {threshold} on {len(group)} prompts")
        records.append(dict(zip(by, key if isinstance(key, tuple) else (key,)), full_score=score,
                            samples=len(group), kept=kept, reason=reason))
    return pd.DataFrame.from_records(records)



def with_full_score(table: pd.DataFrame) -> pd.DataFrame:
    """Non-full rows, each with `full_score`: the full cache's score on the same prompt and mode."""
    keys = ["task", "length", "depth", "sample", "mode"]
    table = table.assign(depth=table.depth.astype(float).fillna(-1.0))
    full = table[table.method == "full"][keys + ["score"]].rename(columns={"score": "full_score"})
    others = table[table.method != "full"]
    paired = others.merge(full, on=keys, how="inner", validate="many_to_one")
    return paired.assign(depth=paired.depth.where(paired.depth >= 0))


def retention_table(table: pd.DataFrame, by=("mode", "method", "budget"), resamples: int = 2000,
                    seed: int = 0) -> pd.DataFrame:
    """Score relative to the full cache on the same prompts: retention = mean score / mean full score per
    group, with a paired bootstrap 95% interval. Columns *by, score, full_score, retention, ci_low, ci_high,
    prompts."""
    paired = with_full_score(table)
    rng = np.random.default_rng(seed)
    records = []
    for key, group in paired.groupby(list(by), sort=True, dropna=False):
        x, y = group.score.to_numpy(float), group.full_score.to_numpy(float)
        retention = x.mean() / y.mean() if y.mean() > 0 else float("nan")
        low = high = retention
        if len(x) > 1 and y.mean() > 0:
            index = rng.integers(0, len(x), size=(resamples, len(x)))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = x[index].mean(1) / y[index].mean(1)
            low, high = np.nanpercentile(ratios, [2.5, 97.5])
        records.append(dict(zip(by, key if isinstance(key, tuple) else (key,)), score=x.mean(),
                            full_score=y.mean(), retention=retention, ci_low=float(low), ci_high=float(high),
                            prompts=len(x)))
    return pd.DataFrame.from_records(records)


def summarize_quality(table: pd.DataFrame, by=("mode", "task", "method", "budget")) -> pd.DataFrame:
    """Mean score with a bootstrap 95% interval per group (the full cache gets budget <NA>)."""
    frame = table.assign(budget=table.budget.astype("float").fillna(-1).astype(int))
    summary = summarize(frame, list(by), "score")
    if "budget" in summary:
        summary["budget"] = summary.budget.replace(-1, pd.NA).astype("Int64")
    return summary


def suite_means(table: pd.DataFrame) -> pd.DataFrame:
    """Unweighted mean over tasks of each task's mean score, per mode, method and budget, on the prompts every
    method ran (budgets below the prompt length)."""
    per_task = table.groupby(["mode", "method", "budget", "task"], dropna=False).score.mean().reset_index()
    return per_task.groupby(["mode", "method", "budget"], dropna=False).score.mean().reset_index(name="suite_mean")


def target_checks(needle_table: pd.DataFrame | None = None, suite_table: pd.DataFrame | None = None, *,
                  mode: str = "question-aware", retention_budget: int = 1024, retention_target: float = 0.95,
                  compare_budgets=(128, 256, 512)) -> pd.DataFrame:
    """The issue's targets as rows: target, measured, met.

    1. SnapKV at `retention_budget` keeps >= `retention_target` of the full cache's needle accuracy, over the
       needle cells where that budget compresses (budget < length).
    2. SnapKV beats StreamingLLM and RandomEviction at every budget in `compare_budgets` on the needle grid
       (mean score over the cells) and on the task-suite mean (unweighted mean over tasks).
    """
    records = []
    if needle_table is not None:
        table = needle_table[needle_table["mode"] == mode]
        retention = retention_table(table)
        row = retention[(retention.method == "snapkv") & (retention.budget == retention_budget)]
        if len(row):
            r = row.iloc[0]
            records.append(dict(target=f"needle: SnapKV-{retention_budget} retention >= {retention_target:.0%}",
                                measured=f"{r.retention:.3f} (95% CI {r.ci_low:.2f}-{r.ci_high:.2f}; "
                                         f"{r.score:.3f} vs full {r.full_score:.3f}, {r.prompts} prompts)",
                                met=bool(r.retention >= retention_target)))
        means = table.groupby(["method", "budget"]).score.mean()
        records += _beats(means, compare_budgets, "needle grid")
    if suite_table is not None:
        means = suite_means(suite_table[suite_table["mode"] == mode]).set_index(["method", "budget"]).suite_mean
        records += _beats(means, compare_budgets, "suite mean")
    return pd.DataFrame.from_records(records, columns=["target", "measured", "met"])


def successor_checks(needle_table: pd.DataFrame | None = None, suite_table: pd.DataFrame | None = None, *,
                     mode: str = "question-aware", calibrated=((512, 0.9), (256, 0.8)), best_budget: int = 512,
                     best_target: float = 0.95) -> pd.DataFrame:
    """The successors' and the calibrated SnapKV's targets as rows: target, measured, met.

    On the needle prompts the full cache answers (its score 1, so a method's mean score there is its share of
    the full cache's accuracy): "snapkv-calibrated" keeps at least each (budget, share) of `calibrated`, and the
    best compressing method at least `best_target` at `best_budget`. On the suite mean (`suite_means`): every
    method of SNAPKV_FAMILY in the table is at or above StreamingLLM at every budget both ran.
    """
    records = []
    if needle_table is not None:
        paired = with_full_score(needle_table[needle_table["mode"] == mode])
        answered = paired[paired.full_score == 1.0]
        means = answered.groupby(["method", "budget"]).score.mean()
        prompts = answered.drop_duplicates(["length", "depth", "sample"]).shape[0]
        for budget, share in calibrated:
            if (CALIBRATED, budget) in means:
                value = means[CALIBRATED, budget]
                records.append(dict(target=f"needle: {CALIBRATED} @ {budget} keeps >= {share:.0%} of the full "
                                           "cache's accuracy", measured=f"{value:.3f} on the {prompts} prompts the "
                                           "full cache answers", met=bool(value >= share)))
        at_budget = means[means.index.get_level_values("budget") == best_budget]
        if len(at_budget):
            (method, _), value = at_budget.idxmax(), at_budget.max()
            records.append(dict(target=f"needle: the best policy @ {best_budget} keeps >= {best_target:.0%}",
                                measured=f"{method} {value:.3f} on the {prompts} prompts the full cache answers",
                                met=bool(value >= best_target)))
    if suite_table is not None:
        means = suite_means(suite_table[suite_table["mode"] == mode]).set_index(["method", "budget"]).suite_mean
        streaming = means.get("streaming")
        ran = [m for m in SNAPKV_FAMILY if m in means.index.get_level_values("method")] if streaming is not None else []
        for method in ran:
            budgets = sorted(set(means[method].index) & set(streaming.index))
            behind = [f"{int(b)} ({means[method, b]:.3f} vs {streaming[b]:.3f})" for b in budgets
                      if means[method, b] < streaming[b]]
            records.append(dict(target=f"suite mean: {method} >= streaming at every budget",
                                measured=f"below at {', '.join(behind)}" if behind else
                                f"at or above at {', '.join(str(int(b)) for b in budgets)}", met=not behind))
    return pd.DataFrame.from_records(records, columns=["target", "measured", "met"])


def _beats(means: pd.Series, budgets, where: str) -> list[dict]:
    records = []
    for budget in budgets:
        snap = means.get(("snapkv", budget))
        if snap is None:
            continue
        for rival in ("streaming", "random"):
            other = means.get((rival, budget))
            if other is None:
                continue
            records.append(dict(target=f"{where}: SnapKV > {rival} at budget {budget}",
                                measured=f"{snap:.3f} vs {other:.3f} ({snap - other:+.3f})", met=bool(snap > other)))
    return records


def accuracy_by_model(table: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """Accuracy against budget per method for several models, from notebook 06's or 07's tables stacked with
    a `model` column (`reporting.runs.read_across_models`).

    mode: which compression mode (None: "question-aware" when present). With one task (the needle) the mean is
    over prompts; with several (the suite) it is the unweighted mean over tasks of each task's mean score, as
    `suite_means`, and the 95% bootstrap interval is over tasks. Returns one row per (model, method, budget; the
    full cache has budget <NA>): model, mode, method, budget, mean, ci_low, ci_high, samples, over ("prompts"
    or "tasks").
    """
    modes = sorted(set(table["mode"]))
    mode = mode or ("question-aware" if "question-aware" in modes else modes[0])
    part = table[table["mode"] == mode]
    part = part.assign(budget=part.budget.astype("float").fillna(-1).astype(int))
    if part.task.nunique() > 1:
        part = part.groupby(["model", "method", "budget", "task"], as_index=False).score.mean()
        over = "tasks"
    else:
        over = "prompts"
    summary = summarize(part, ["model", "method", "budget"], "score")
    summary["budget"] = summary.budget.replace(-1, pd.NA).astype("Int64")
    order = list(dict.fromkeys(table.model))
    summary = summary.assign(_model=summary.model.map(order.index)).sort_values(["_model", "method", "budget"])
    return summary.drop(columns="_model").assign(mode=mode, over=over).reset_index(drop=True)
