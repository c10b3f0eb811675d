"""The speed/memory figure: decode ms/token and memory vs prompt length, full cache vs SnapKV."""

import math

import pandas as pd

from snapkv.analysis.speed.tables import configuration_label, longest_prompt_within


def speed_memory_figure(table: pd.DataFrame, extrapolated: pd.DataFrame, *, memory_limit_gib: float | None,
                        caption: str):
    """Top row: decode ms/token vs prompt length; bottom row: weights + KV cache (GiB), measured (markers) and
    extrapolated (dashed), with the memory limit as a horizontal line; one column per batch size.
    Returns (matplotlib figure, plotly figure) of the same data."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import plotly.graph_objects as go
    import seaborn as sns
    from plotly.subplots import make_subplots

    ok = table[table["status"] == "ok"].copy()
    ok["config"] = [configuration_label(m, b) for m, b in zip(ok["method"], ok["budget"])]
    configs = sorted(ok["config"].unique(), key=lambda c: (c != "FullCache", len(c), c))
    palette = dict(zip(configs, sns.color_palette("viridis_r", len(configs)).as_hex()))
    palette["FullCache"] = "#d62728"
    batches = sorted(ok["batch_size"].unique())
    limits = longest_prompt_within(ok, memory_limit_gib) if memory_limit_gib else None

    sns.set_theme(style="whitegrid")
    figure, axes = plt.subplots(2, len(batches), figsize=(5.2 * len(batches), 8.5), squeeze=False)
    titles = [f"batch {b}" for b in batches] + [""] * len(batches)
    interactive = make_subplots(rows=2, cols=len(batches), horizontal_spacing=0.06,
                                vertical_spacing=0.08, subplot_titles=titles)
    for column, batch in enumerate(batches):
        speed_axis, memory_axis = axes[0, column], axes[1, column]
        for config in configs:
            part = ok[(ok["batch_size"] == batch) & (ok["config"] == config)].sort_values("prompt_len")
            line = extrapolated[(extrapolated["batch_size"] == batch) & (extrapolated["config"] == config)]
            line = line.sort_values("prompt_len")
            color, show = palette[config], column == 0
            speed_axis.plot(part["prompt_len"], part["decode_ms_per_token"], marker="o", color=color, label=config)
            memory_axis.plot(line["prompt_len"], line["memory_gib"], ls="--", lw=1, color=color)
            memory_axis.plot(part["prompt_len"], part["memory_mib"] / 1024, marker="o", ls="", color=color)
            hover = "%{x} tokens: %{y:.1f} ms/token<extra>" + config + "</extra>"
            interactive.add_trace(go.Scatter(x=part["prompt_len"], y=part["decode_ms_per_token"], name=config,
                                             legendgroup=config, showlegend=show, mode="lines+markers",
                                             line={"color": color}, hovertemplate=hover), row=1, col=column + 1)
            interactive.add_trace(go.Scatter(x=line["prompt_len"], y=line["memory_gib"], name=config,
                                             legendgroup=config, showlegend=False, mode="lines",
                                             line={"color": color, "dash": "dash", "width": 1},
                                             hovertemplate="%{x} tokens: %{y:.2f} GiB (extrapolated)<extra>"
                                             + config + "</extra>"), row=2, col=column + 1)
            interactive.add_trace(go.Scatter(x=part["prompt_len"], y=part["memory_mib"] / 1024, name=config,
                                             legendgroup=config, showlegend=False, mode="markers",
                                             marker={"color": color},
                                             hovertemplate="%{x} tokens: %{y:.2f} GiB (measured)<extra>"
                                             + config + "</extra>"), row=2, col=column + 1)
        if memory_limit_gib:
            memory_axis.axhline(memory_limit_gib, color="black", lw=1.2, label=f"limit {memory_limit_gib:g} GiB")
            interactive.add_hline(y=memory_limit_gib, line={"color": "black", "width": 1.2}, row=2, col=column + 1,
                                  annotation_text=f"limit {memory_limit_gib:g} GiB")
            longest = limits.loc[limits["batch_size"] == batch, "longest_prompt"]
            if len(longest) and pd.notna(longest.iloc[0]):
                n = int(longest.iloc[0])
                text = f"full cache exceeds\nthe limit beyond\n{_tokens(n)} tokens"
                memory_axis.axvline(n, color=palette["FullCache"], ls=":", lw=1.2)
                memory_axis.text(n, memory_limit_gib, " " + text.replace("\n", "\n "), va="bottom", fontsize=8,
                                 color=palette["FullCache"])
                interactive.add_vline(x=math.log10(n), line={"color": palette["FullCache"], "dash": "dot"},
                                      row=2, col=column + 1, annotation_text=text.replace("\n", " "),
                                      annotation_position="bottom right")
        for axis in (speed_axis, memory_axis):
            axis.set_xscale("log", base=2)
        memory_axis.set_yscale("log")
        memory_axis.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        memory_axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        memory_axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        lengths = sorted(extrapolated["prompt_len"].unique())
        memory_axis.set_xticks(lengths, [_tokens(n) for n in lengths], rotation=45)
        measured = sorted(ok["prompt_len"].unique())
        speed_axis.set_xticks(measured, [_tokens(n) for n in measured])
        for axis in (speed_axis, memory_axis):
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        speed_axis.set(title=f"batch {batch}", xlabel="prompt tokens",
                       ylabel="decode ms / token (median)" if column == 0 else "")
        memory_axis.set(xlabel="prompt tokens", ylabel="weights + KV cache (GiB)" if column == 0 else "")
        interactive.update_xaxes(type="log", row=1, col=column + 1)
        interactive.update_xaxes(type="log", title_text="prompt tokens", row=2, col=column + 1)
        interactive.update_yaxes(type="log", row=2, col=column + 1)
    axes[0, 0].legend(fontsize=8)
    if memory_limit_gib:
        axes[1, 0].legend(fontsize=8, loc="upper left")
    interactive.update_yaxes(title_text="decode ms / token (median)", row=1, col=1)
    interactive.update_yaxes(title_text="weights + KV cache (GiB)", row=2, col=1)
    figure.suptitle(f"Decode speed and memory, full cache vs SnapKV ({caption})", fontsize=11)
    figure.tight_layout()
    interactive.update_layout(title=f"Decode speed and memory, full cache vs SnapKV ({caption})",
                              height=800, width=max(700, 420 * len(batches)))
    return figure, interactive


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else (f"{n / 1024:.1f}K" if n >= 1024 else str(n))
