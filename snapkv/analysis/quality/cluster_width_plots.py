"""Figures of the cluster-width sweep (notebook 10, `snapkv.analysis.quality.cluster_width`), one function per
figure; each returns a seaborn/matplotlib figure and a plotly figure of the same summary: x = pooling kernel
(log scale), one panel per experiment or measure, one colour per budget (or window), 95% bootstrap bands."""

import math
import textwrap

import matplotlib.pyplot as plt
import pandas as pd
import plotly.graph_objects as go
import seaborn as sns
from matplotlib.colors import to_hex
from plotly.subplots import make_subplots

from snapkv.analysis.quality.cluster_width import HIT_RATE_MEASURES, PAPER_KERNEL, RETENTION_MEASURES, chosen_cells

LINE_STYLES = ("-", "--", ":", "-.")
PLOTLY_DASHES = ("solid", "dash", "dot", "dashdot")
MARKERS = ("o", "s", "^", "D")
PLOTLY_MARKERS = ("circle", "square", "triangle-up", "diamond")


def _label(column: str, value) -> str:
    return str(value) if column == "model" else f"{column.removesuffix('_size')} {value}"


def _spread(kernels: list, octaves: float) -> list:
    """The kernels to label on a log axis: each at least `octaves` (powers of 2) right of the last one labelled, so
    that the labels of a narrow panel do not overlap (unlabelled kernels keep their points and hover text)."""
    shown = []
    for kernel in kernels:
        if not shown or math.log2(kernel / shown[-1]) >= octaves:
            shown.append(kernel)
    return shown


def _kernel_panels(summary: pd.DataFrame, panel: str, panels: list, color: str, style: str | None, title: str,
                   ylabels: dict, full_cache: dict | None = None, unit_range: set | None = None,
                   colors: list | None = None):
    """One panel per value of `panel`, x = kernel_size, one line per value of `color` (and line style and marker
    per value of `style`, if given): the mean, with its 95% band (ci_low..ci_high) for the first style, as error
    bars in plotly; `full_cache` {panel: value} draws a grey dashed line; panels in `unit_range` span 0..1;
    `colors`: the values of `color` in legend order (default: sorted)."""
    style = style or color
    colors = colors or sorted(summary[color].unique())
    styles = sorted(summary[style].unique())
    palette = dict(zip(colors, sns.color_palette("viridis", len(colors))))
    kernels = sorted(summary.kernel_size.unique())
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 1.5, 4.0), squeeze=False)
    interactive = make_subplots(rows=1, cols=len(panels), subplot_titles=[str(p) for p in panels],
                                horizontal_spacing=0.06)
    for column, (ax, name) in enumerate(zip(axes[0], panels), start=1):
        part = summary[summary[panel] == name]
        if full_cache and name in full_cache:
            ax.axhline(full_cache[name], color="grey", linestyle="--", linewidth=1, label="full cache")
            interactive.add_trace(go.Scatter(x=kernels, y=[full_cache[name]] * len(kernels), mode="lines",
                                             line={"color": "grey", "dash": "dash"}, name="full cache",
                                             legendgroup="full", showlegend=column == 1), row=1, col=column)
        ax.axvline(PAPER_KERNEL, color="#bbbbbb", linewidth=0.8, zorder=0)
        for (value, kind), group in sorted(part.groupby([color, style]), key=lambda item: colors.index(item[0][0])):
            group = group.sort_values("kernel_size")
            dash = styles.index(kind) % len(LINE_STYLES)
            label = _label(color, value) + (f", {_label(style, kind)}" if style != color else "")
            ax.plot(group.kernel_size, group["mean"], marker=MARKERS[dash], markersize=4, color=palette[value],
                    linestyle=LINE_STYLES[dash], label=label)
            if dash == 0:  # bands for the first line style only (the main window): the others would hide them
                ax.fill_between(group.kernel_size, group.ci_low, group.ci_high, color=palette[value], alpha=0.08)
            interactive.add_trace(go.Scatter(
                x=group.kernel_size, y=group["mean"], mode="lines+markers", name=label, legendgroup=label,
                showlegend=column == 1, line={"color": to_hex(palette[value]), "dash": PLOTLY_DASHES[dash]},
                marker={"symbol": PLOTLY_MARKERS[dash]},
                error_y={"type": "data", "symmetric": False, "array": group.ci_high - group["mean"],
                         "arrayminus": group["mean"] - group.ci_low},
                hovertemplate="kernel %{x}<br>%{y:.2f}<extra>" + label + "</extra>"), row=1, col=column)
        ax.set_xscale("log", base=2)
        ax.set_xticks(kernels, [str(k) for k in kernels])
        ax.set(title="\n".join(textwrap.wrap(str(name), 40)), xlabel="pooling kernel (tokens)",
               ylabel=ylabels.get(name, ""))
        if unit_range and name in unit_range:
            ax.set_ylim(-0.02, 1.02)
            interactive.update_yaxes(range=[-0.02, 1.02], row=1, col=column)
        interactive.update_yaxes(title_text=ylabels.get(name, ""), row=1, col=column)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle("\n".join(textwrap.wrap(title, 45 * len(panels))), fontsize=11)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.92))
    interactive.update_xaxes(type="log", title_text="pooling kernel (tokens)", tickangle=0,
                             tickvals=_spread(kernels, octaves=0.15 * len(panels)))
    interactive.update_layout(title="<br>".join(textwrap.wrap(title, 120)), height=480)
    return fig, interactive


def accuracy_by_kernel_figure(accuracy: pd.DataFrame, caption: str):
    """Accuracy against the pooling kernel, one panel per experiment and cell subset (all prompts / prompts the
    full cache answers), one colour per budget, line style per observation window; the full cache's accuracy
    on the same cells is the grey dashed line. accuracy: `cluster_width.accuracy_by_kernel` (stacked)."""
    frame = accuracy.assign(panel=accuracy.experiment + ": " + accuracy.cells)
    panels = list(dict.fromkeys(frame.sort_values(["experiment", "cells"], ascending=[True, False]).panel))
    full = frame.drop_duplicates("panel").set_index("panel").full_cache.to_dict()
    return _kernel_panels(frame, "panel", panels, "budget", "window_size",
                          f"Accuracy against the pooling kernel ({caption})", dict.fromkeys(panels, "accuracy"),
                          full, set(panels))


def value_retention_figure(retention: pd.DataFrame, caption: str):
    """Needle-token retention against the pooling kernel: the share of (layer, KV head) pairs that keep every
    token of the value (left) and the mean share per value token (right), one colour per budget, line style per
    window. retention: `cluster_width.value_retention_by_kernel`."""
    panels = [m for m in RETENTION_MEASURES.values() if m in set(retention.measure)]
    return _kernel_panels(retention, "measure", panels, "budget", "window_size",
                          f"Which (layer, KV head) pairs keep the needle's value ({caption})",
                          dict.fromkeys(panels, "share of (layer, KV head) pairs"), None, set(panels))


def hit_rate_by_kernel_figure(summary: pd.DataFrame, caption: str):
    """Notebook 01's observation hit rate with pooled votes against the kernel: hit rate, hit rate without sinks,
    attention-mass recall and the mean width of the voted set's clusters, one colour per observation window.
    summary: `cluster_width.hit_rate_by_kernel`."""
    panels = [m for m in HIT_RATE_MEASURES.values() if m in set(summary.measure)]
    unit = {m for m in panels if "width" not in m}
    ylabels = {m: ("tokens" if "width" in m else "share") for m in panels}
    return _kernel_panels(summary, "measure", panels, "window_size", None,
                          f"Observation hit rate with pooled votes ({caption})", ylabels, None, unit)


def accuracy_by_kernel_by_model_figure(accuracy: pd.DataFrame, caption: str):
    """Notebook 12: accuracy against the pooling kernel at one budget, one panel per experiment, one colour per
    model (in size order); the full cache's accuracy per model is in the reading (it differs by model).
    accuracy: `cluster_width.accuracy_by_kernel_by_model`."""
    frame = pd.concat([chosen_cells(part) for _, part in accuracy.groupby(["model", "experiment"], sort=False)])
    frame = frame.assign(panel=frame.experiment + ": " + frame.cells)
    panels = list(dict.fromkeys(frame.panel))
    return _kernel_panels(frame, "panel", panels, "model", None,
                          f"Accuracy against the pooling kernel by model ({caption})",
                          dict.fromkeys(panels, "accuracy"), None, set(panels),
                          colors=list(dict.fromkeys(accuracy.model)))
