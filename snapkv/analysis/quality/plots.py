"""Figures of the long-context quality experiments (snapkv.analysis.quality), one function per figure.

Each takes DataFrames made by `quality` (a tidy table, `summarize_quality`, `retention_table`, `calibrate`)
and returns a seaborn/matplotlib figure and a plotly figure of the same data.
"""

import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import seaborn as sns
from plotly.subplots import make_subplots

METHOD_ORDER = ("full", "snapkv", "snapkv-calibrated", "snapkv-avgpool", "snapkv-nopool", "adakv", "pyramidkv",
                "chunkkv", "h2o", "random", "streaming")
MODE_DASH = {"question-aware": "-", "question-agnostic": "--"}
PLOTLY_DASH = {"question-aware": "solid", "question-agnostic": "dash"}


def _method_rank(name: str) -> int:
    return METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)


def _panel_name(method: str, budget) -> str:
    return "full cache" if pd.isna(budget) else f"{method} @ {int(budget)}"


def _colors(methods) -> dict:
    """A distinct colour per method: the strong tab10 colours first, then their light halves, with tab10's grey
    (which draws the full cache) replaced by tab20b's dark and light indigo."""
    tab20, indigo = sns.color_palette("tab20", 20), sns.color_palette("tab20b", 20)
    palette = tab20[::2] + tab20[1::2]
    palette[7], palette[17] = indigo[0], indigo[2]
    others = [m for m in methods if _method_rank(m) >= len(METHOD_ORDER)]  # after the known ones, in given order
    return {m: palette[(_method_rank(m) if m not in others else len(METHOD_ORDER) + others.index(m)) % len(palette)]
            for m in methods}


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")  # matplotlib
PLOTLY_SYMBOLS = {"o": "circle", "s": "square", "^": "triangle-up", "D": "diamond", "v": "triangle-down",
                  "P": "cross", "X": "x", "*": "star", "<": "triangle-left", ">": "triangle-right", "h": "hexagon"}
DODGE_OCTAVES = 0.035  # horizontal offset between neighbouring methods on a log2 budget axis


def _markers(methods) -> dict:
    return {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}


def _dodged(budgets, index: int, count: int):
    """Budgets shifted by a few hundredths of an octave per method (log axis), so methods with equal scores
    (e.g. AdaKV = SnapKV with one KV head) draw side by side instead of on top of each other."""
    return np.asarray(budgets, dtype=float) * 2.0 ** (DODGE_OCTAVES * (index - (count - 1) / 2))


def _budget_ticks(budgets) -> dict:
    """Plotly x-axis ticks at the budgets themselves."""
    return {"tickvals": list(budgets), "ticktext": [str(int(b)) for b in budgets]}


def _hex(color) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in color[:3])


def needle_heatmap_figure(table: pd.DataFrame, caption: str, mode: str = "question-aware"):
    """The paper's needle figure: one heatmap per (method, budget), x = context length, y = needle depth,
    colour = mean score (red 0 to green 1); grey cells were not run (budget >= length)."""
    part = table[(table["mode"] == mode) & (table.task == "needle")]
    if part.empty:
        raise ValueError(f"no needle rows in mode {mode!r}")
    cells = part.groupby(["method", "budget", "length", "depth"], dropna=False).score.mean().reset_index()
    panels = sorted({(m, b) for m, b in zip(cells.method, cells.budget)},
                    key=lambda mb: (_method_rank(mb[0]), -1 if pd.isna(mb[1]) else mb[1]))
    lengths, depths = sorted(part.length.unique()), sorted(part.depth.unique())
    grids = []
    for method, budget in panels:
        rows = cells[(cells.method == method) & (cells.budget.isna() if pd.isna(budget) else cells.budget == budget)]
        grid = rows.pivot_table(index="depth", columns="length", values="score", aggfunc="mean", dropna=False)
        grids.append(grid.reindex(index=depths, columns=lengths))
    columns = min(4, len(panels))
    rows_n = math.ceil(len(panels) / columns)
    sns.set_theme(style="white")
    inches = 3.2 * rows_n + 0.6  # the title keeps its 0.9 inch above the first row's panel titles at any height
    fig, axes = plt.subplots(rows_n, columns, figsize=(3.4 * columns + 1, inches), squeeze=False,
                             gridspec_kw={"hspace": 0.5, "top": 1 - 0.9 / inches})
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    cmap = sns.color_palette("RdYlGn", as_cmap=True).with_extremes(bad="#d9d9d9")
    for ax, (method, budget), grid in zip(axes.flat, panels, grids):
        sns.heatmap(grid, ax=ax, cmap=cmap, vmin=0, vmax=1, cbar=False, annot=grid.shape[0] * grid.shape[1] <= 60,
                    fmt=".1f", annot_kws={"fontsize": 7}, linewidths=0.3, linecolor="white")
        mean = float(np.nanmean(grid.values)) if np.isfinite(grid.values).any() else float("nan")
        ax.set_title(f"{_panel_name(method, budget)}  (mean {mean:.2f})", fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1)), ax=axes.ravel().tolist(),
                 shrink=0.6, label="score")
    fig.suptitle(f"Needle in a haystack, {mode} ({caption})", fontsize=11, y=1 - 0.2 / inches)

    height = 280 * rows_n + 120  # pixels; 60 of them between rows, whatever the number of rows
    interactive = make_subplots(rows=rows_n, cols=columns, subplot_titles=[_panel_name(*p) for p in panels],
                                horizontal_spacing=0.04, vertical_spacing=60 / height)
    for i, grid in enumerate(grids):
        interactive.add_trace(go.Heatmap(z=grid.values, x=[str(x) for x in grid.columns],
                                         y=[f"{y:.0%}" for y in grid.index], coloraxis="coloraxis",
                                         hovertemplate="length %{x}<br>depth %{y}<br>score %{z:.2f}<extra></extra>"),
                              row=i // columns + 1, col=i % columns + 1)
    interactive.update_xaxes(title_text="context length (tokens)", row=rows_n)
    interactive.update_yaxes(title_text="needle depth", col=1)
    interactive.update_layout(title=f"Needle in a haystack, {mode} ({caption})",
                              coloraxis={"colorscale": "RdYlGn", "cmin": 0, "cmax": 1, "colorbar": {"title": "score"}},
                              height=height)
    return fig, interactive


def _method_trace(method: str, mode: str, x, y, budgets: pd.Series, what: str, color, marker: str,
                  **extra) -> go.Scatter:
    """One method's plotly line in one mode, drawn at `x` (dodged) and hovering the real budget and `what`."""
    return go.Scatter(x=x, y=y, mode="lines+markers", legendgroup=f"{method} {mode}",
                      line={"color": _hex(color), "dash": PLOTLY_DASH.get(mode, "dot")},
                      marker={"symbol": PLOTLY_SYMBOLS[marker]}, customdata=budgets.astype(int),
                      hovertemplate=f"{method} ({mode})<br>budget %{{customdata}}<br>{what} %{{y:.3f}}<extra></extra>",
                      **extra)


def accuracy_vs_budget_figure(summary: pd.DataFrame, retention: pd.DataFrame, caption: str):
    """Score (top row, mean with 95% bootstrap band) and retention relative to the full cache (bottom row)
    against the budget, one column per task, one colour and marker per method, solid = question-aware, dashed =
    question-agnostic, each line shifted a little along the budget axis (`_dodged`) so equal lines stay
    visible; the full cache is the grey line of the top row.

    summary: `summarize_quality(table, ["mode", "task", "method", "budget"])`; retention:
    `retention_table(table, ["mode", "task", "method", "budget"])`.
    """
    tasks = sorted(summary.task.unique())
    methods = sorted((m for m in summary.method.unique() if m != "full"), key=_method_rank)
    colors, markers = _colors(methods), _markers(methods)
    lines = sorted({(m, mode) for m, mode in zip(summary.method, summary["mode"]) if m != "full"},
                   key=lambda line: (_method_rank(line[0]), line[1]))
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.4), sharex=True, squeeze=False)
    interactive = make_subplots(rows=2, cols=len(tasks), subplot_titles=tasks + [""] * len(tasks), shared_xaxes=True,
                                vertical_spacing=0.08)
    budgets = sorted(summary.budget.dropna().unique())
    for column, task in enumerate(tasks):
        top, bottom = axes[0][column], axes[1][column]
        part = summary[summary.task == task]
        for mode, full in part[part.method == "full"].groupby("mode"):
            top.axhline(full["mean"].iloc[0], color="grey", linestyle=MODE_DASH.get(mode, ":"), linewidth=1,
                        label=f"full cache ({mode})")
            interactive.add_trace(go.Scatter(x=budgets, y=[full["mean"].iloc[0]] * len(budgets), mode="lines",
                                             line={"color": "grey", "dash": PLOTLY_DASH.get(mode, "dot")},
                                             name=f"full ({mode})", legendgroup=f"full {mode}",
                                             showlegend=column == 0), row=1, col=column + 1)
        for index, (method, mode) in enumerate(lines):  # legend in METHOD_ORDER
            group = part[(part.method == method) & (part["mode"] == mode)].sort_values("budget")
            if group.empty:
                continue
            x = _dodged(group.budget, index, len(lines))
            top.plot(x, group["mean"], marker=markers[method], markersize=4, color=colors[method],
                     linestyle=MODE_DASH.get(mode, ":"), label=f"{method} ({mode})")
            top.fill_between(x, group.ci_low, group.ci_high, color=colors[method], alpha=0.12)
            interactive.add_trace(_method_trace(
                method, mode, x, group["mean"], group.budget, "score", colors[method], markers[method],
                name=f"{method} ({mode})", showlegend=column == 0,
                error_y={"type": "data", "symmetric": False, "array": group.ci_high - group["mean"],
                         "arrayminus": group["mean"] - group.ci_low}), row=1, col=column + 1)
        kept = retention[retention.task == task]
        for index, (method, mode) in enumerate(lines):
            group = kept[(kept.method == method) & (kept["mode"] == mode)].sort_values("budget")
            if group.empty:
                continue
            x = _dodged(group.budget, index, len(lines))
            bottom.plot(x, group.retention, marker=markers[method], markersize=4, color=colors[method],
                        linestyle=MODE_DASH.get(mode, ":"))
            interactive.add_trace(_method_trace(method, mode, x, group.retention, group.budget, "retention",
                                                colors[method], markers[method], showlegend=False),
                                  row=2, col=column + 1)
        bottom.axhline(1.0, color="grey", linewidth=1)
        top.set(title=task, ylabel="score" if column == 0 else "", ylim=(-0.02, 1.02))
        bottom.set(xlabel="budget (prompt tokens kept)", ylabel="retention vs full" if column == 0 else "")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(int(b)) for b in budgets])
    fig.suptitle(f"Accuracy against budget ({caption})", fontsize=11)
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.93), title="method (mode)")
    interactive.update_xaxes(type="log", **_budget_ticks(budgets))
    interactive.update_xaxes(title_text="budget (prompt tokens kept)", row=2)
    interactive.update_yaxes(title_text="score", row=1, col=1)
    interactive.update_yaxes(title_text="retention vs full", row=2, col=1)
    interactive.update_layout(title=f"Accuracy against budget ({caption})", height=650)
    return fig, interactive


def pooling_ablation_figure(summary: pd.DataFrame, caption: str):
    """Pooling ablation: needle score against context length for SnapKV with maxpool, avgpool and no pooling
    at one budget (mean with 95% bootstrap band). summary: `summarize_quality(rows, ["pooling", "length"])`."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(6, 4))
    palette = dict(zip(("maxpool", "avgpool", "none"), sns.color_palette("viridis", 3)))
    interactive = go.Figure()
    for pooling, group in summary.groupby("pooling", sort=True):
        group = group.sort_values("length")
        color = palette.get(pooling, "black")
        ax.plot(group.length, group["mean"], marker="o", color=color, label=pooling)
        ax.fill_between(group.length, group.ci_low, group.ci_high, color=color, alpha=0.2)
        interactive.add_trace(go.Scatter(x=group.length, y=group["mean"], mode="lines+markers", name=pooling,
                                         error_y={"type": "data", "symmetric": False,
                                                  "array": group.ci_high - group["mean"],
                                                  "arrayminus": group["mean"] - group.ci_low}))
    ax.set(xlabel="context length (tokens)", ylabel="needle score", ylim=(-0.02, 1.02),
           title=f"SnapKV pooling ablation ({caption})")
    ax.legend(title="pooling")
    fig.tight_layout()
    interactive.update_layout(title=f"SnapKV pooling ablation ({caption})", xaxis_title="context length (tokens)",
                              yaxis_title="needle score", yaxis_range=[-0.02, 1.02])
    return fig, interactive


def needle_tokens_figure(table: pd.DataFrame, caption: str):
    """Share of (layer, KV head) pairs keeping each token of the needle sentence, one panel per prompt, one bar
    colour per (method, budget); the value's tokens are shaded. table: `quality.needle_retention_experiment`."""
    table = table.assign(panel=[f"{n} tokens, depth {d:.0%}, sample {s}" for n, d, s in
                                zip(table.length, table.depth, table["sample"])],
                         setting=[_panel_name(m, b) for m, b in zip(table.method, table.budget)])
    panels = list(dict.fromkeys(table.sort_values(["length", "depth", "sample"]).panel))
    settings = list(dict.fromkeys(table.sort_values(["budget"]).setting))
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels) + 0.6), squeeze=False)
    interactive = make_subplots(rows=len(panels), cols=1, subplot_titles=panels, vertical_spacing=0.12)
    colors = dict(zip(settings, sns.color_palette("viridis", len(settings))))
    for row, (ax, panel) in enumerate(zip(axes[:, 0], panels), start=1):
        part = table[table.panel == panel]
        tokens = part.drop_duplicates("index").sort_values("index")
        labels = [f"{t!r}"[1:-1] for t in tokens.token]
        for index in tokens.loc[tokens.in_value, "index"]:
            ax.axvspan(index - 0.5, index + 0.5, color="#fde68a", zorder=0)
        sns.barplot(part, x="index", y="kept_share", hue="setting", hue_order=settings, palette=colors, ax=ax)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        answers = "; ".join(f"{s}: {a.strip()!r}" for s, a in part.drop_duplicates("setting")[["setting", "answer"]]
                            .itertuples(index=False))
        ax.set(xlabel="", ylabel="kept share", ylim=(0, 1.02), title=f"{panel}\n{answers}")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        for setting in settings:
            group = part[part.setting == setting].sort_values("index")
            interactive.add_trace(go.Bar(x=labels, y=group.kept_share, name=setting, legendgroup=setting,
                                         marker_color=_hex(colors[setting]), showlegend=row == 1,
                                         hovertext=[f"answer {a!r}" for a in group.answer]), row=row, col=1)
    fig.suptitle("\n".join(textwrap.wrap(f"Which needle tokens survive compression (value shaded; {caption})", 110)),
                 fontsize=10)
    fig.tight_layout()
    interactive.update_yaxes(title_text="kept share", range=[0, 1.02])
    interactive.update_layout(title=f"Which needle tokens survive compression ({caption})", barmode="group",
                              height=300 * len(panels) + 120)
    return fig, interactive


def calibration_figure(calibration: pd.DataFrame, caption: str, threshold: float):
    """Full-cache score per task and length; cells below `threshold` (dropped formats) are hatched/marked."""
    grid = calibration.pivot_table(index="task", columns="length", values="full_score", aggfunc="mean")
    sns.set_theme(style="white")
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 3, 0.6 * grid.shape[0] + 1.8))
    labels = grid.map(lambda v: "" if pd.isna(v) else f"{v:.2f}" + ("" if v >= threshold else "\ndropped"))
    sns.heatmap(grid, ax=ax, cmap="RdYlGn", vmin=0, vmax=1, annot=labels, fmt="", annot_kws={"fontsize": 8},
                cbar_kws={"label": "full-cache score"}, linewidths=0.5, linecolor="white")
    ax.set(title=f"Calibration: full cache, threshold {threshold} ({caption})", xlabel="context length (tokens)",
           ylabel="task")
    fig.tight_layout()
    interactive = go.Figure(go.Heatmap(z=grid.values, x=[str(c) for c in grid.columns], y=list(grid.index), zmin=0,
                                       zmax=1, colorscale="RdYlGn", text=labels.values, texttemplate="%{text}",
                                       colorbar={"title": "full-cache score"}))
    interactive.update_layout(title=f"Calibration: full cache, threshold {threshold} ({caption})",
                              xaxis_title="context length (tokens)", yaxis_title="task")
    return fig, interactive


def accuracy_by_model_figure(summary: pd.DataFrame, caption: str, ylabel: str = "accuracy"):
    """Accuracy against budget, one panel per model, one line and marker per method (mean with its 95% bootstrap
    band), shifted a little along the budget axis (`_dodged`) so equal lines stay visible; the full cache is a
    grey dashed horizontal line across the budgets.

    summary: `statistics.accuracy_by_model`. The plotly figure is built from one frame sorted by (model,
    method, budget) in which the full cache is repeated at each budget of its model, so every trace's points
    come from the same rows."""
    import plotly.express as px

    models = list(dict.fromkeys(summary.model))
    methods = sorted((m for m in summary.method.unique() if m != "full"), key=_method_rank)
    colors = _colors(methods) | {"full cache": (0.5, 0.5, 0.5)}
    markers = _markers(methods) | {"full cache": "o"}
    rows = []
    for model in models:
        part = summary[summary.model == model]
        compressed = part[part.method != "full"]
        budgets = sorted(compressed.budget.dropna().astype(int).unique())
        rows.append(compressed.assign(method_label=compressed.method))
        full = part[part.method == "full"]
        if len(full) and budgets:
            rows.append(pd.concat([full.iloc[[0]]] * len(budgets), ignore_index=True)
                        .assign(budget=budgets, method_label="full cache"))
    order = ["full cache", *methods]
    data = pd.concat(rows, ignore_index=True) if rows else summary.assign(method_label=summary.method)
    data = data.assign(budget=data.budget.astype(float), _model=data.model.map(models.index),
                       _method=data.method_label.map(order.index))
    data["x"] = [_dodged([b], order.index(m) - 1, len(methods))[0] if m != "full cache" else b
                 for b, m in zip(data.budget, data.method_label)]
    data = data.sort_values(["_model", "_method", "budget"]).drop(columns=["_model", "_method"])

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(models), figsize=(5.4 * len(models), 4.2), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        part = data[data.model == model]
        for name in order:
            group = part[part.method_label == name]
            if group.empty:
                continue
            if name == "full cache":
                ax.axhline(group["mean"].iloc[0], color="grey", linestyle="--", linewidth=1.2, label=name)
                continue
            ax.plot(group.x, group["mean"], marker=markers[name], markersize=4, color=colors[name], label=name)
            ax.fill_between(group.x, group.ci_low, group.ci_high, color=colors[name], alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set(title=model, xlabel="budget (prompt tokens kept)", ylabel=ylabel, ylim=(-0.02, 1.02))
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    title = f"{ylabel.capitalize()} vs budget per method, by model ({caption})"
    fig.suptitle(textwrap.fill(title, 50 * len(models)))
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), title="method", fontsize=8, loc="upper left",
               bbox_to_anchor=(1.0, 0.9))

    data = data.assign(ci_plus=data.ci_high - data["mean"], ci_minus=data["mean"] - data.ci_low)
    interactive = px.line(data, x="x", y="mean", color="method_label", facet_col="model", markers=True,
                          symbol="method_label", symbol_map={m: PLOTLY_SYMBOLS[k] for m, k in markers.items()},
                          error_y="ci_plus", error_y_minus="ci_minus", log_x=True,
                          hover_data={"x": False, "budget": True, "samples": True, "over": True},
                          category_orders={"model": models, "method_label": order},
                          color_discrete_map={m: _hex(c) for m, c in colors.items()},
                          labels={"mean": ylabel, "x": "budget (prompt tokens kept)", "budget": "budget",
                                  "method_label": "method"},
                          title=(wrapped := "<br>".join(textwrap.wrap(title, 110))))
    for trace in interactive.data:
        if trace.name == "full cache":
            trace.update(line={"dash": "dash", "width": 1.2}, marker={"size": 4}, error_y={"visible": False})
    interactive.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    budgets = sorted(data.budget.dropna().unique())
    interactive.update_xaxes(**_budget_ticks(budgets))
    interactive.update_yaxes(range=[-0.02, 1.02])
    interactive.update_layout(margin={"t": 80 + 30 * wrapped.count("<br>")})  # a long caption (many models) wraps
    return fig, interactive
