"""Readings of the quality experiments across models: pure functions of `statistics.accuracy_by_model` that
return Markdown, the comparisons behind each verdict computed here, under test."""

import numpy as np
import pandas as pd

BASELINES = ("streaming", "random")  # the target: SnapKV beats these at every budget


def accuracy_by_model_reading(summary: pd.DataFrame, what: str) -> str:
    """Notebook 12: per model, the full cache's accuracy, SnapKV's at its largest budget relative to it, and at
    how many budgets SnapKV is at or above each baseline; then whether that holds on every model.

    summary: `statistics.accuracy_by_model`; what: the experiment's name in the text ("needle", "task suite")."""
    models = list(dict.fromkeys(summary.model))
    lines = [f"{what.capitalize()} accuracy vs budget on {len(models)} model(s) ({summary['mode'].iloc[0]}, mean "
             f"over {summary.over.iloc[0]}):"]
    holds: dict[str, dict[str, bool]] = {baseline: {} for baseline in BASELINES}
    best: dict[str, dict[int, tuple[tuple[str, ...], float]]] = {}
    for model in models:
        part = summary[summary.model == model]
        full = part[part.method == "full"]["mean"]
        snap = part[part.method == "snapkv"].dropna(subset=["budget"]).set_index("budget")["mean"]
        text = f"- {model}: full cache {full.iloc[0]:.2f}" if len(full) else f"- {model}: no full-cache rows"
        if len(snap) and len(full):
            largest = int(snap.index.max())
            share = f" ({snap[largest] / full.iloc[0]:.0%} of the full cache)" if full.iloc[0] > 0 else ""
            text += f"; SnapKV @ {largest} {snap[largest]:.2f}{share}"
        for baseline in BASELINES:
            other = part[part.method == baseline].dropna(subset=["budget"]).set_index("budget")["mean"]
            shared = sorted(set(snap.index) & set(other.index))
            if not shared:
                continue
            ahead = [b for b in shared if snap[b] >= other[b]]
            holds[baseline][model] = len(ahead) == len(shared)
            behind = [int(b) for b in shared if b not in ahead]
            text += (f"; at or above {baseline} at " + ("every budget" if not behind else
                     f"{len(ahead)} of {len(shared)} budgets (below at {', '.join(map(str, behind))})"))
        best[model] = _best_per_budget(part)
        if best[model]:
            text += "; best compressing method: " + ", ".join(f"{' = '.join(methods)} {value:.2f} @ {budget}"
                                                              for budget, (methods, value) in best[model].items())
        lines.append(text + ".")
    for baseline, by_model in holds.items():
        if len(by_model) < 2:
            continue
        if all(by_model.values()):
            lines.append(f"**Holds on every model:** SnapKV is at or above {baseline} at every budget.")
        else:
            held = [m for m, ok in by_model.items() if ok]
            lines.append(f"**Does not hold on every model:** SnapKV is at or above {baseline} at every budget on "
                         f"{', '.join(held) if held else 'no model'}.")
    tops = [set(methods) for per_budget in best.values() for methods, _ in per_budget.values()]
    always = set.intersection(*tops) if tops else set()
    if len(best) > 1 and all(best.values()) and len(always) == 1:
        tied = " (tied at some budgets)" if any(len(top) > 1 for top in tops) else ""
        lines.append(f"**Holds on every model:** {always.pop()} is the best compressing method at every "
                     f"budget{tied}.")
    fulls = summary[summary.method == "full"].set_index("model")["mean"]
    if len(fulls) > 1 and fulls.max() - fulls.min() >= 0.1:
        lines.append(f"The full caches differ ({', '.join(f'{m} {v:.2f}' for m, v in fulls.items())}): a model that "
                     "solves fewer prompts uncompressed has less for any method to keep.")
    if len(models) < 2:
        lines.append(f"Only {', '.join(models)} has data: nothing to compare across models.")
    return "\n".join(lines)


def _best_per_budget(part: pd.DataFrame) -> dict[int, tuple[tuple[str, ...], float]]:
    """{budget: (methods, mean)}: the compressing methods with the highest mean at each budget, all of them when
    several tie, in the table's order."""
    compressed = part[part.method != "full"].dropna(subset=["budget"])
    best = {}
    for budget, group in compressed.groupby("budget", sort=True):
        top = float(group["mean"].max())
        best[int(budget)] = (tuple(group.loc[np.isclose(group["mean"], top, rtol=0, atol=1e-9), "method"]), top)
    return best
