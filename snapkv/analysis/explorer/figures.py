"""Figures of the explorer: one head's votes, kept positions and generated rows (plotly and matplotlib)."""

import textwrap

import numpy as np
import pandas as pd

from snapkv.analysis.explorer.tables import generation_rows_or_none, generation_table, head_table, token_labels
from snapkv.core.policies import SnapKV
from snapkv.core.trace import Trace

MAX_HOVER_CELLS = 400_000  # heatmap cells that get a token in their hover text
# the heatmap's colour scale stops at this quantile: the first positions (attention sinks) take most of the
# attention and would otherwise set a linear scale on which everything else is one dark colour
COLOR_QUANTILE = 0.995


def color_cap(attention: np.ndarray) -> float:
    """The top of the generation heatmap's colour scale: the `COLOR_QUANTILE` of its values (hover shows the
    true value of a cell above it)."""
    return max(float(np.quantile(attention, COLOR_QUANTILE)), 1e-6) if attention.size else 1.0


def row_label(generated) -> str:
    """What one row of the generation heatmap is, for both figures' axis: "generated token" or
    "generated window of N tokens"."""
    return f"generated {generated[1]}"


def _title(trace: Trace, layer: int, head: int, budget: int, table: pd.DataFrame, steps: pd.DataFrame | None) -> str:
    share = "" if steps is None or not len(steps) else (
        f", generation attention on kept: {steps.kept_share.mean():.0%} "
        f"({steps.kept_share_after_sink.mean():.0%} after the first 4 positions)")
    return (f"{trace.metadata.get('model_id')}, layer {layer}, head {head}: budget {budget} keeps "
            f"{int(table.kept.sum())} of {len(table)} prompt positions{share}")


def _panels(trace: Trace, layer: int, head: int, *, row: int, **settings):
    """What both figures draw: the head's table of prompt positions, its generated rows (or None) and the
    per-row table of generation steps (or None)."""
    table = head_table(trace, layer, head, row=row, **settings)
    generated = generation_rows_or_none(trace, layer, row)
    steps = generation_table(trace, layer, head, row=row, **settings) if generated else None
    return table, generated, steps


def explorer_figure(trace: Trace, layer: int, head: int, *, budget: int, window_size: int | None = None,
                    kernel_size: int = SnapKV.kernel_size, pooling: str = SnapKV.pooling, method: str = "snapkv",
                    gqa: str | None = None, kv_heads: int | None = None,
                    tokenizer=None, row: int = 0):
    """Plotly figure, x = prompt position in three aligned panels: the window's votes (pooled score) with the
    kept positions marked; each generated row's attention (heatmap); generation's mean attention with the kept
    positions marked. Hover shows the prompt token under the cursor (and the generated token of a row)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    table, generated, steps = _panels(trace, layer, head, budget=budget, window_size=window_size,
                                      kernel_size=kernel_size, pooling=pooling, method=method, gqa=gqa,
                                      kv_heads=kv_heads,
                                      tokenizer=tokenizer, row=row)
    kept = table[table.kept]
    tokens = table.token.to_numpy()
    figure = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.05, row_heights=[0.25, 0.5, 0.25],
                           subplot_titles=["observation window votes (score SnapKV ranks)",
                                           f"generation attention per {generated[1] if generated else 'token'} "
                                           f"(colour capped at the {COLOR_QUANTILE:.1%} quantile)",
                                           "generation attention, mean over rows"])
    hover = "position %{x}: %{customdata}<br>%{y:.4f}<extra></extra>"
    figure.add_trace(go.Scatter(x=table.position, y=table.score, name="score (pooled votes)", mode="lines",
                                customdata=tokens, hovertemplate=hover, line={"color": "#1f77b4"}), row=1, col=1)
    figure.add_trace(go.Scatter(x=table.position, y=table.vote, name="vote (this head)", mode="lines",
                                customdata=tokens, hovertemplate=hover, line={"color": "#aec7e8", "width": 1}),
                     row=1, col=1)
    figure.add_trace(go.Scatter(x=kept.position, y=kept.score.fillna(0), name=f"kept ({len(kept)})", mode="markers",
                                customdata=kept.token, hovertemplate="kept %{x}: %{customdata}<extra></extra>",
                                marker={"color": "#d62728", "size": 5}), row=1, col=1)
    if generated:
        attention = generated[0][head].numpy()
        _, labels = token_labels(trace, tokenizer, row)
        labels = (labels if trace.reducer != "window_sum" else [f"window {i}" for i in range(attention.shape[0])])
        labels = labels[: attention.shape[0]]
        heatmap = dict(z=attention, x=table.position, y=np.arange(attention.shape[0]), colorscale="Viridis",
                       zmin=0, zmax=color_cap(attention), name="generation",
                       colorbar={"title": "attention", "len": 0.45, "y": 0.5})
        if attention.size <= MAX_HOVER_CELLS:
            cells = np.empty(attention.shape, dtype=object)
            for i, label in enumerate(labels):
                cells[i] = [f"{label!r} -> {token!r}" for token in tokens]
            heatmap |= dict(customdata=cells, hovertemplate=f"{row_label(generated)} %{{y}} -> position %{{x}}<br>"
                                                            "%{customdata}<br>%{z:.4f}<extra></extra>")
        figure.add_trace(go.Heatmap(**heatmap), row=2, col=1)
        figure.add_trace(go.Scatter(x=table.position, y=table.generation_mean, name="generation mean", mode="lines",
                                    customdata=tokens, hovertemplate=hover, line={"color": "#2ca02c"}), row=3, col=1)
        figure.add_trace(go.Scatter(x=kept.position, y=kept.generation_mean, name="kept", mode="markers",
                                    customdata=kept.token, hovertemplate="kept %{x}: %{customdata}<extra></extra>",
                                    marker={"color": "#d62728", "size": 5}, showlegend=False), row=3, col=1)
        figure.update_yaxes(title_text=row_label(generated), autorange="reversed", row=2, col=1)
    window_start = int(table.position[table.in_window].min())
    for panel in (1, 2, 3):
        figure.add_vrect(x0=window_start - 0.5, x1=len(table) - 0.5, fillcolor="grey", opacity=0.15, line_width=0,
                         row=panel, col=1)
    figure.update_yaxes(type="log", row=1, col=1)
    figure.update_yaxes(type="log", row=3, col=1)
    figure.update_xaxes(title_text="prompt position (grey: observation window)", row=3, col=1)
    title = "<br>".join(textwrap.wrap(_title(trace, layer, head, budget, table, steps), 100))
    figure.update_layout(title={"text": title, "font": {"size": 14}}, height=800, margin={"t": 120},
                         legend={"orientation": "h", "y": -0.12}, hovermode="closest")
    return figure


def static_figure(trace: Trace, layer: int, head: int, *, budget: int, window_size: int | None = None,
                  kernel_size: int = SnapKV.kernel_size, pooling: str = SnapKV.pooling, method: str = "snapkv",
                  gqa: str | None = None, kv_heads: int | None = None,
                  tokenizer=None, row: int = 0):
    """The same three panels as `explorer_figure`, in matplotlib/seaborn (for PNG and headless runs)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    table, generated, steps = _panels(trace, layer, head, budget=budget, window_size=window_size,
                                      kernel_size=kernel_size, pooling=pooling, method=method, gqa=gqa,
                                      kv_heads=kv_heads,
                                      tokenizer=tokenizer, row=row)
    kept = table[table.kept]
    sns.set_theme(style="whitegrid")
    figure, (votes, heat, mean) = plt.subplots(3, 1, figsize=(12, 8.5), sharex=True, layout="constrained",
                                               gridspec_kw={"height_ratios": [1, 2, 1]})
    votes.plot(table.position, table.score, color="#1f77b4", lw=1, label="score (pooled votes)")
    votes.plot(table.position, table.vote, color="#aec7e8", lw=0.8, label="vote (this head)")
    votes.scatter(kept.position, kept.score.fillna(0), s=6, color="#d62728", zorder=3, label=f"kept ({len(kept)})")
    votes.set(ylabel="window votes (log)")
    votes.legend(fontsize=8, loc="upper left")
    window_start = int(table.position[table.in_window].min())
    if generated:
        attention = generated[0][head].numpy()
        image = heat.imshow(attention, aspect="auto", interpolation="nearest", cmap="viridis",
                            extent=(-0.5, len(table) - 0.5, attention.shape[0] - 0.5, -0.5),
                            vmin=0, vmax=color_cap(attention))
        figure.colorbar(image, ax=[votes, heat, mean], pad=0.01, shrink=0.5,
                        label=f"attention (capped at the {COLOR_QUANTILE:.1%} quantile)")
        heat.set(ylabel=row_label(generated))
        heat.grid(False)
        mean.plot(table.position, table.generation_mean, color="#2ca02c", lw=1)
        mean.scatter(kept.position, kept.generation_mean, s=6, color="#d62728", zorder=3)
    else:
        heat.text(0.5, 0.5, "no generated rows in this trace", ha="center", transform=heat.transAxes)
    mean.set(ylabel="generation mean (log)", xlabel="prompt position (grey: observation window)")
    votes.set_yscale("log")
    mean.set_yscale("log")
    for axis in (votes, heat, mean):
        axis.axvspan(window_start - 0.5, len(table) - 0.5, color="grey", alpha=0.15, lw=0)
    figure.suptitle("\n".join(textwrap.wrap(_title(trace, layer, head, budget, table, steps), 130)), fontsize=10)
    return figure


def kept_attention_figure(table: pd.DataFrame, budget: int):
    """Heatmap layer x head of `kept_attention_table`'s kept_share (plotly)."""
    import plotly.express as px

    grid = table.pivot(index="layer", columns="head", values="kept_share")
    return px.imshow(grid, color_continuous_scale="Viridis", zmin=0, zmax=1, aspect="auto",
                     labels={"color": "kept share", "x": "head", "y": "layer"},
                     title=f"Share of generation's prompt attention on the positions budget {budget} keeps")
