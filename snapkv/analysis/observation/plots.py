"""One function per figure. Each takes a summary DataFrame (from `metrics.summarize`) and returns a
seaborn/matplotlib figure and a plotly figure of the same data."""

import textwrap

import matplotlib.pyplot as plt
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import seaborn as sns

# reference sets (same size as the voted set) are drawn dashed in fixed colours next to the SnapKV curves
REFERENCE_STYLE = {"random": "tab:red", "recency": "tab:orange", "streaming": "tab:brown"}


def _lines(summary: pd.DataFrame, *, x: str, hue: str, facet: str | None, title: str, ylabel: str,
           xlabel: str, reference: float | None = None, ylim=None):
    """Mean line with a shaded confidence band per `hue`, one panel per `facet` value."""
    sns.set_theme(style="whitegrid")
    facets = sorted(summary[facet].unique()) if facet else [None]
    fig, axes = plt.subplots(1, len(facets), figsize=(6 * len(facets), 4.2), sharey=True, squeeze=False)
    for ax, value in zip(axes[0], facets):
        part = summary if value is None else summary[summary[facet] == value]
        names = sorted(part[hue].unique(), key=str)
        main = [n for n in names if n not in REFERENCE_STYLE]
        colors = dict(zip(main, sns.color_palette("viridis", len(main)))) | REFERENCE_STYLE
        for name in names:
            group = part[part[hue] == name].sort_values(x)
            dashed = name in REFERENCE_STYLE
            ax.plot(group[x], group["mean"], color=colors[name], label=str(name), marker="o", markersize=3,
                    linestyle="--" if dashed else "-", linewidth=1 if dashed else 1.5)
            ax.fill_between(group[x], group["ci_low"], group["ci_high"], color=colors[name], alpha=0.15)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{facet} = {value}" if value is not None else "")
        if ylim:
            ax.set_ylim(*ylim)
        ax.legend(title=hue, fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, width=60 * len(facets))))
    fig.tight_layout()
    interactive = px.line(summary.sort_values(x), x=x, y="mean", color=summary[hue].astype(str),
                          facet_col=facet, markers=True, title=title,
                          error_y=summary["ci_high"] - summary["mean"],
                          error_y_minus=summary["mean"] - summary["ci_low"],
                          labels={"mean": ylabel, "color": hue, x: xlabel})
    return fig, interactive


def hit_rate_along_generation_figure(summary: pd.DataFrame, caption: str, ylabel: str = "hit rate"):
    """Paper Fig. 2: x = layer, y = hit rate, one line per generation window (`series`) and dashed
    reference sets, one panel per protocol."""
    return _lines(summary, x="layer", hue="series", facet="protocol", xlabel="layer", ylabel=ylabel,
                  title=f"{ylabel.capitalize()} along generation ({caption})", ylim=(0, 1.02))


def sensitivity_figure(summary: pd.DataFrame, caption: str):
    """Hit rate (mean over layers) vs the importance threshold and vs the top-k fraction, per set."""
    return _lines(summary, x="value", hue="reference", facet="sweep", xlabel="threshold / top-k fraction",
                  ylabel="hit rate", title=f"Sensitivity to the metric's settings ({caption})", ylim=(0, 1.02))


def windows_along_prompt_figure(summary: pd.DataFrame, caption: str):
    """v2 Fig. 2: x = window along the prompt (-1 = the observation window), y = hit rate, one panel per
    layer group, SnapKV and dashed reference sets."""
    return _lines(summary, x="prompt_window", hue="reference", facet="layers", xlabel="prompt window (-1 = last)",
                  ylabel="hit rate", title=f"Prompt windows as observation window ({caption})", ylim=(0, 1.02))


def question_overlap_figure(summary: pd.DataFrame, chance: float, caption: str):
    """v2 Fig. 4: x = layer, y = overlap of two questions' voted sets, and of reference sets; grey = chance."""
    return _lines(summary, x="layer", hue="reference", facet=None, xlabel="layer",
                  ylabel="overlap of voted sets", title=f"Different questions, same document ({caption})",
                  reference=chance, ylim=(0, 1.05))


def question_position_figure(summary: pd.DataFrame, caption: str):
    """v2 Fig. 5: x = layer, y = hit rate, one panel per question placement, SnapKV and dashed references."""
    return _lines(summary, x="layer", hue="reference", facet="placement", xlabel="layer", ylabel="hit rate",
                  title=f"Question before vs after the document ({caption})", ylim=(0, 1.02))


def head_heatmap_figure(table: pd.DataFrame, caption: str):
    """Layer x head heatmap of the mean hit rate."""
    grid = table.pivot_table(index="layer", columns="head", values="hit_rate", aggfunc="mean")
    sns.set_theme(style="white")
    fig, ax = plt.subplots(figsize=(0.6 * grid.shape[1] + 3, 0.25 * grid.shape[0] + 2))
    sns.heatmap(grid, ax=ax, cmap="viridis", vmin=0, vmax=1, cbar_kws={"label": "hit rate"})
    ax.set_title(f"Hit rate per head ({caption})")
    fig.tight_layout()
    interactive = go.Figure(go.Heatmap(z=grid.values, x=grid.columns, y=grid.index, zmin=0, zmax=1,
                                       colorscale="Viridis", colorbar={"title": "hit rate"}))
    interactive.update_layout(title=f"Hit rate per head ({caption})", xaxis_title="head", yaxis_title="layer")
    return fig, interactive


def voting_variants_figure(summary: pd.DataFrame, caption: str):
    """Mean hit rate per layer for each voting variant, one panel per setting."""
    return _lines(summary, x="layer", hue="value", facet="setting", xlabel="layer", ylabel="hit rate",
                  title=f"How the voted set is made ({caption})", ylim=(0, 1.02))


def observation_metrics_figure(summary: pd.DataFrame, caption: str):
    """Per layer, one panel per metric (hit rate, hit rate without sinks, attention-mass recall, sink
    share): the voted set next to dashed reference sets of the same size."""
    return _lines(summary, x="layer", hue="reference", facet="metric", xlabel="layer", ylabel="value",
                  title=f"What the hit rate measures ({caption})", ylim=(0, 1.02))
