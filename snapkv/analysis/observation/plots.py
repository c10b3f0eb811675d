"""One function per figure. Each takes a summary DataFrame (from `metrics.summarize`) and returns a
seaborn/matplotlib figure and a plotly figure of the same data."""

import textwrap

import matplotlib.pyplot as plt
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import seaborn as sns

# reference sets (same size as the voted set) are drawn in fixed colours next to the SnapKV curves, each with its own
# dash and marker, and recency wider and underneath: recency and streaming often coincide, and both must stay visible
REFERENCE_STYLE = {"random": "tab:red", "recency": "tab:orange", "streaming": "tab:brown"}
REFERENCE_LINES = {"random": dict(linestyle="--", marker="x", linewidth=1.2, zorder=3),
                   "recency": dict(linestyle=":", marker="s", linewidth=3.2, zorder=2),
                   "streaming": dict(linestyle="-.", marker="^", linewidth=1.2, zorder=4)}
PLOTLY_REFERENCE_LINES = {"random": dict(dash="dash", width=1.5, symbol="x"),
                          "recency": dict(dash="dot", width=4, symbol="square"),
                          "streaming": dict(dash="dashdot", width=1.5, symbol="triangle-up")}


def _hex(color) -> str:
    import matplotlib.colors

    return matplotlib.colors.to_hex(color)


def _wrapped(title: str, width: int, separator: str) -> str:
    return separator.join(textwrap.wrap(title, width=width))


def _lines(summary: pd.DataFrame, *, x: str, hue: str, facet: str | None, title: str, ylabel: str,
           xlabel: str, reference: float | None = None, ylim=None):
    """Mean line with a shaded confidence band per `hue`, one panel per `facet` value.

    summary: one row per (facet, hue, x) with columns mean, ci_low, ci_high. The plotly figure is built from
    one frame sorted by (facet, hue, x), so every trace's x, y and error bars come from the same rows."""
    sns.set_theme(style="whitegrid")
    facets = sorted(summary[facet].unique()) if facet else [None]
    names = sorted(summary[hue].unique(), key=str)
    main = [n for n in names if n not in REFERENCE_STYLE]
    colors = dict(zip(main, sns.color_palette("viridis", len(main)))) | REFERENCE_STYLE
    fig, axes = plt.subplots(1, len(facets), figsize=(6 * len(facets), 4.2), sharey=True, squeeze=False)
    for ax, value in zip(axes[0], facets):
        part = summary if value is None else summary[summary[facet] == value]
        for name in names:
            group = part[part[hue] == name].sort_values(x)
            if group.empty:
                continue
            style = REFERENCE_LINES.get(name, dict(linestyle="-", marker="o", linewidth=1.5, zorder=5))
            ax.plot(group[x], group["mean"], color=colors[name], label=str(name), markersize=3, **style)
            ax.fill_between(group[x], group["ci_low"], group["ci_high"], color=colors[name], alpha=0.15)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{facet} = {value}" if value is not None else "")
        if ylim:
            ax.set_ylim(*ylim)
    # one legend for all panels, outside them: inside a panel it covers the data
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle(_wrapped(title, 60 * len(facets), "\n"))
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), title=hue, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.9))

    data = summary.assign(**{hue: summary[hue].astype(str)})
    data = data.assign(ci_plus=data["ci_high"] - data["mean"], ci_minus=data["mean"] - data["ci_low"])
    data = data.sort_values([c for c in (facet, hue, x) if c])
    interactive = px.line(data, x=x, y="mean", color=hue, facet_col=facet, markers=True,
                          error_y="ci_plus", error_y_minus="ci_minus",
                          category_orders={hue: [str(n) for n in names], **({facet: facets} if facet else {})},
                          color_discrete_map={str(n): _hex(c) for n, c in colors.items()},
                          title=_wrapped(title, 110, "<br>"), labels={"mean": ylabel, x: xlabel})
    for trace in interactive.data:
        style = PLOTLY_REFERENCE_LINES.get(trace.name)
        if style:
            trace.update(line={"dash": style["dash"], "width": style["width"]}, marker={"symbol": style["symbol"]})
    if reference is not None:
        interactive.add_hline(y=reference, line={"color": "grey", "dash": "dash", "width": 1},
                              annotation_text="chance", annotation_position="bottom right")
    if ylim:
        interactive.update_yaxes(range=list(ylim))
    interactive.update_layout(margin={"t": 110})
    return fig, interactive


def hit_rate_along_generation_figure(summary: pd.DataFrame, caption: str, ylabel: str = "hit rate"):
    """Paper Fig. 2: x = layer, y = hit rate, one line per generation window (`series`) and broken-line
    reference sets, one panel per protocol."""
    return _lines(summary, x="layer", hue="series", facet="protocol", xlabel="layer", ylabel=ylabel,
                  title=f"{ylabel.capitalize()} along generation ({caption})", ylim=(0, 1.02))


def sensitivity_figure(summary: pd.DataFrame, caption: str):
    """Hit rate (mean over layers) vs the importance threshold and vs the top-k fraction, per set."""
    return _lines(summary, x="value", hue="reference", facet="sweep", xlabel="threshold / top-k fraction",
                  ylabel="hit rate", title=f"Sensitivity to the metric's settings ({caption})", ylim=(0, 1.02))


def windows_along_prompt_figure(summary: pd.DataFrame, caption: str):
    """v2 Fig. 2: x = window along the prompt (-1 = the observation window), y = hit rate, one panel per
    layer group, SnapKV and broken-line reference sets."""
    return _lines(summary, x="prompt_window", hue="reference", facet="layers", xlabel="prompt window (-1 = last)",
                  ylabel="hit rate", title=f"Prompt windows as observation window ({caption})", ylim=(0, 1.02))


def question_overlap_figure(summary: pd.DataFrame, chance: float, caption: str):
    """v2 Fig. 4: x = layer, y = overlap of two questions' voted sets, and of reference sets; grey = chance."""
    return _lines(summary, x="layer", hue="reference", facet=None, xlabel="layer",
                  ylabel="overlap of voted sets", title=f"Different questions, same document ({caption})",
                  reference=chance, ylim=(0, 1.05))


def question_position_figure(summary: pd.DataFrame, caption: str):
    """v2 Fig. 5: x = layer, y = hit rate, one panel per question placement, SnapKV and broken-line references."""
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
    share): the voted set next to broken-line reference sets of the same size."""
    return _lines(summary, x="layer", hue="reference", facet="metric", xlabel="layer", ylabel="value",
                  title=f"What the hit rate measures ({caption})", ylim=(0, 1.02))


SNAPKV_LINE = dict(linestyle="-", marker="o", linewidth=1.8, zorder=5)


def hit_rate_by_depth_figure(summary: pd.DataFrame, caption: str):
    """Hit rate against relative layer depth (0 = first layer, 1 = last) for several models: one panel with
    sinks and one without, one colour per model, SnapKV's voted set solid, the reference sets broken.

    summary: `metrics.hit_rate_by_depth`. The plotly figure is built from one frame sorted by
    (sinks, model, reference, depth), one trace per (model, set) and panel."""
    sns.set_theme(style="whitegrid")
    panels = [p for p in ("with sinks", "without sinks") if p in set(summary.sinks)]
    models = list(dict.fromkeys(summary.model))  # in the order of the runs
    sets = sorted(summary.reference.unique(), key=lambda r: (r != "snapkv", r))
    colors = dict(zip(models, sns.color_palette("deep", len(models))))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for model in models:
            for name in sets:
                group = summary[(summary.sinks == panel) & (summary.model == model) & (summary.reference == name)]
                group = group.sort_values("depth")
                if group.empty:
                    continue
                style = REFERENCE_LINES.get(name, SNAPKV_LINE)
                label = f"{model}, {'SnapKV' if name == 'snapkv' else name}"
                ax.plot(group.depth, group["mean"], color=colors[model], label=label, markersize=3, **style)
                if name == "snapkv":
                    ax.fill_between(group.depth, group.ci_low, group.ci_high, color=colors[model], alpha=0.15)
        ax.set(xlabel="relative layer depth (0 = first layer, 1 = last)", ylabel="hit rate", title=panel,
               xlim=(-0.02, 1.02), ylim=(0, 1.02))
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle(_wrapped(f"Hit rate by relative layer depth ({caption})", 64 * len(panels), "\n"))
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), title="model, set", fontsize=8, loc="upper left",
               bbox_to_anchor=(1.0, 0.9))

    data = summary.assign(set=summary.reference.map(lambda r: "SnapKV" if r == "snapkv" else r))
    data = data.assign(ci_plus=data.ci_high - data["mean"], ci_minus=data["mean"] - data.ci_low)
    data = data.assign(_model=data.model.map(models.index), _set=data.reference.map(sets.index))
    data = data.sort_values(["sinks", "_model", "_set", "depth"]).drop(columns=["_model", "_set"])
    set_names = ["SnapKV" if r == "snapkv" else r for r in sets]
    interactive = px.line(data, x="depth", y="mean", color="model", line_dash="set", symbol="set", facet_col="sinks",
                          markers=True, error_y="ci_plus", error_y_minus="ci_minus", hover_data=["layer", "layers"],
                          category_orders={"sinks": panels, "model": models, "set": set_names},
                          color_discrete_map={m: _hex(c) for m, c in colors.items()},
                          line_dash_map={"SnapKV": "solid", **{r: PLOTLY_REFERENCE_LINES[r]["dash"]
                                                                for r in sets if r in PLOTLY_REFERENCE_LINES}},
                          labels={"mean": "hit rate", "depth": "relative layer depth"},
                          title=(title := _wrapped(f"Hit rate by relative layer depth ({caption})", 110, "<br>")))
    for trace in interactive.data:
        if not trace.name.endswith("SnapKV"):
            trace.update(error_y={"visible": False}, line={"width": 1.3})
    interactive.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    interactive.update_yaxes(range=[0, 1.02])
    interactive.update_xaxes(range=[-0.02, 1.02])
    interactive.update_layout(margin={"t": 80 + 30 * title.count("<br>")})  # a long caption (many models) wraps
    return fig, interactive
