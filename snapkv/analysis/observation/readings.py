"""The observation notebooks' "Reading" sections: pure functions of their result tables that return
Markdown text, verdicts included (so the thresholds behind each verdict live here, under test)."""

import pandas as pd

from snapkv.analysis.observation.metrics import pool, summarize

HIGH_HIT_RATE = 0.5  # the paper's Fig. 2 spans 0.5 to 1.0: "high" starts here
STABLE_CHANGE = 0.1  # a hit rate that moves less than this from the first to the last window is "stable"


def hit_rate_verdict(hit_rate: float, first_window: float, last_window: float) -> str:
    """Whether a hit rate is the high, stable curve of the paper's Fig. 2."""
    if hit_rate >= HIGH_HIT_RATE and abs(first_window - last_window) < STABLE_CHANGE:
        return "high and stable along the answer, as the paper reports for Mistral-7B (its plot spans 0.5 to 1.0)"
    return "not the high, stable curve the paper reports"


def hit_rate_reading(table: pd.DataFrame, protocols, model_name: str, n_samples: int) -> str:
    """Notebook 01: per protocol, SnapKV's hit rate (first and last window) against the best reference set,
    without sinks and as mass recall; then the verdict on the first protocol."""
    overall = pool(table, ["protocol", "reference"]).set_index(["protocol", "reference"])
    windows = pool(table[table.reference == "snapkv"], ["protocol", "window"]).set_index(["protocol", "window"])
    per_sample = pool(table[table.reference == "snapkv"], ["protocol", "sample"])
    last_window = table.window.max()
    lines = [f"On {model_name} (n = {n_samples} samples; all layers, heads and answer tokens pooled; 95% bootstrap "
             "intervals over the samples' own hit rates):"]
    for protocol in protocols:
        snap = overall.loc[(protocol, "snapkv")]
        refs = overall.loc[protocol].drop("snapkv")
        first, last = windows.loc[(protocol, 0), "hit_rate"], windows.loc[(protocol, last_window), "hit_rate"]
        own = per_sample[per_sample.protocol == protocol]
        ci, ci_no_sinks = (summarize(own, ["protocol"], metric).iloc[0] for metric in ("hit_rate", "hit_rate_no_sinks"))
        lines.append(
            f"- **{protocol}**: SnapKV hit rate {snap.hit_rate:.2f} [{ci.ci_low:.2f}, {ci.ci_high:.2f}] (first window "
            f"{first:.2f}, last {last:.2f}); best reference set: {refs.hit_rate.idxmax()} {refs.hit_rate.max():.2f}. "
            f"Without sinks SnapKV scores {snap.hit_rate_no_sinks:.2f} [{ci_no_sinks.ci_low:.2f}, "
            f"{ci_no_sinks.ci_high:.2f}] (best reference {refs.hit_rate_no_sinks.max():.2f}); {snap.sink_share:.0%} "
            f"of important entries sit on sinks. Attention-mass recall: SnapKV {snap.mass_recall:.2f}, best "
            f"reference {refs.mass_recall.max():.2f}.")
    main = protocols[0]
    verdict = hit_rate_verdict(overall.loc[(main, "snapkv"), "hit_rate"], windows.loc[(main, 0), "hit_rate"],
                               windows.loc[(main, last_window), "hit_rate"])
    lines.append(f"The headline hit rate is {verdict}; the sink-free hit rate and the mass recall against the "
                 "reference sets show how much of it is the window's prediction rather than the sinks every set "
                 "contains.")
    return "\n".join(lines)


def interval_verdict(last: pd.Series, earliest: pd.Series) -> str:
    """Which of two summaries (mean, ci_low, ci_high) is higher, when their intervals do not overlap."""
    if last.ci_low > earliest.ci_high:
        return "the last window predicts better"
    if last.ci_high < earliest.ci_low:
        return "the earliest window predicts better"
    return "no clear difference (the intervals overlap)"


def last_vs_earliest(rows: pd.DataFrame, metric: str) -> str:
    """SnapKV's `metric` at prompt window -1 against the earliest window, with 95% bootstrap intervals
    over samples (rows: one per sample and prompt window, e.g. `pool`ed)."""
    result = summarize(rows[rows.reference == "snapkv"], ["prompt_window"], metric).set_index("prompt_window")
    earliest_window = result.index.min()
    last, earliest = result.loc[-1], result.loc[earliest_window]
    return (f"{last['mean']:.2f} [{last.ci_low:.2f}, {last.ci_high:.2f}] at -1 vs {earliest['mean']:.2f} "
            f"[{earliest.ci_low:.2f}, {earliest.ci_high:.2f}] at {earliest_window}: {interval_verdict(last, earliest)}")


def windows_along_prompt_reading(table: pd.DataFrame, n_samples: int) -> str:
    """Notebook 02: the last against the earliest prompt window over all layers and per `layers` span, with
    and without sinks, and the reference sets at window -1."""
    over_layers = pool(table, ["sample", "prompt_window", "reference"])
    by_span = pool(table, ["sample", "prompt_window", "layers", "reference"])
    lines = [f"SnapKV hit rate of the last vs the earliest prompt window ({n_samples} samples; the paper reports "
             "that the last windows predict best). Sinks sit in every window's voted set, so the sink-free hit rate "
             "shows what the window's position changes:",
             f"- all layers: {last_vs_earliest(over_layers, 'hit_rate')}; "
             f"without sinks {last_vs_earliest(over_layers, 'hit_rate_no_sinks')}."]
    for span in sorted(by_span.layers.unique()):
        part = by_span[by_span.layers == span]
        lines.append(f"- {span}: {last_vs_earliest(part, 'hit_rate')}; "
                     f"without sinks {last_vs_earliest(part, 'hit_rate_no_sinks')}.")
    at_last = (over_layers[over_layers.prompt_window == -1]
               .groupby("reference")[["hit_rate", "hit_rate_no_sinks"]].mean())
    best = at_last.hit_rate.drop("snapkv").idxmax()
    lines.append(f"At window -1 the best reference set ({best}) scores {at_last.hit_rate[best]:.2f} "
                 f"(SnapKV {at_last.hit_rate['snapkv']:.2f}); without sinks SnapKV scores "
                 f"{at_last.hit_rate_no_sinks['snapkv']:.2f} and {best} {at_last.hit_rate_no_sinks[best]:.2f}.")
    return "\n".join(lines)


def question_overlap_reading(summary: pd.DataFrame, chance: float, num_layers: int) -> str:
    """Notebook 03: mean overlap of two questions' voted sets against random sets, and whether it falls
    from the first half of the layers to the second (summary: reference, layer, mean)."""
    half = num_layers // 2
    snap = summary[summary.reference == "snapkv"]
    random_overlap = summary[summary.reference == "random"]["mean"].mean()
    early, late = snap[snap.layer < half]["mean"].mean(), snap[snap.layer >= half]["mean"].mean()
    verdict = ("As the paper reports, overlap falls with depth: later layers pick question-specific positions, so "
               "compression must see the question." if late < early
               else "Unlike the paper, overlap does not fall with depth on this model.")
    return (f"Two questions' voted sets share {snap['mean'].mean():.0%} of their positions on average; two random "
            f"sets of the same size share {random_overlap:.0%} (chance {chance:.0%}), and question-blind sets "
            "(recency, StreamingLLM) share 100% by construction. "
            f"{early:.0%} in the first half of the layers and {late:.0%} in the second. {verdict}")


PLACEMENTS = ("beginning", "end")


def question_position_reading(table: pd.DataFrame) -> str:
    """Notebook 04: SnapKV against the best reference set for each placement of the question, and whether
    both placements stay high."""
    overall = pool(table, ["placement", "reference"]).set_index(["placement", "reference"])
    lines = []
    for placement in PLACEMENTS:
        snap, refs = overall.loc[(placement, "snapkv")], overall.loc[placement].drop("snapkv")
        lines.append(f"- question at the **{placement}**: SnapKV hit rate {snap.hit_rate:.2f}, best reference "
                     f"({refs.hit_rate.idxmax()}) {refs.hit_rate.max():.2f}; without sinks "
                     f"{snap.hit_rate_no_sinks:.2f} vs {refs.hit_rate_no_sinks.max():.2f}.")
    low = min(overall.loc[(placement, "snapkv"), "hit_rate"] for placement in PLACEMENTS)
    lines.append("As in the paper, both placements stay high." if low >= HIGH_HIT_RATE
                 else f"Unlike the paper, at least one placement stays below {HIGH_HIT_RATE} on this model.")
    return "\n".join(lines)


def voting_variants_reading(summary: pd.DataFrame, heads: pd.DataFrame, window_sizes) -> str:
    """Notebook 05: mean hit rate per window size, pooling kernel and GQA mode (summary: setting, value,
    layer, mean), and the least predictable heads (heads: one row per sample, layer and head of one variant)."""
    overall = summary.groupby(["setting", "value"])["mean"].mean()
    counts = heads.groupby(["layer", "head"])[["hits", "important"]].sum()
    counts = counts[counts.important > 0]  # a head with no important entry has no hit rate
    rates = (counts.hits / counts.important).sort_values()
    worst = ", ".join(f"L{layer}H{head} ({rate:.2f})" for (layer, head), rate in rates.head(5).items())
    windows = overall["window_size"].reindex([str(w) for w in window_sizes])
    gqa = overall["gqa"]
    return "\n".join([
        "- Hit rate by observation window: " + ", ".join(f"{w}: {v:.2f}" for w, v in windows.items()) + ".",
        "- Pooling kernel: " + ", ".join(f"{k}: {v:.2f}" for k, v in overall["kernel_size"].items()) + ".",
        "- GQA aggregation: " + ", ".join(f"{g}: {v:.2f}" for g, v in gqa.items())
        + f" (a shared set per KV group costs {gqa['expand'] - gqa[['mean', 'max']].max():.2f} against one set "
        "per query head).",
        f"- Least predictable heads: {worst}; the median head scores {rates.median():.2f} "
        f"({len(rates)} heads with at least one important position).",
    ])


def _depth_comparison(summary: pd.DataFrame, sinks: str) -> dict[str, pd.DataFrame]:
    """Per model: SnapKV's mean and the best reference set's mean at each layer (columns layer, depth, snapkv,
    best, best_set), for the rows with `sinks`."""
    result = {}
    for model, part in summary[summary.sinks == sinks].groupby("model", sort=False):
        wide = part.pivot_table(index=["layer", "depth"], columns="reference", values="mean").reset_index()
        others = [c for c in wide.columns if c not in ("layer", "depth", "snapkv")]
        if "snapkv" not in wide or not others:
            continue
        wide = wide.dropna(subset=["snapkv"])
        result[model] = wide.assign(best=wide[others].max(axis=1), best_set=wide[others].idxmax(axis=1))
    return result


def hit_rate_by_depth_reading(summary: pd.DataFrame) -> str:
    """Notebook 12: what holds across the models of `metrics.hit_rate_by_depth` and what does not: at how many
    depths SnapKV's hit rate beats the best reference set (with and without sinks), its mean over layers and
    the depth where it is lowest."""
    models = list(dict.fromkeys(summary.model))
    lines = [f"Hit rate by relative layer depth on {len(models)} model(s) ({', '.join(models)}; "
             f"{summary.protocol.iloc[0]} answers):"]
    verdicts = {}
    for sinks in ("with sinks", "without sinks"):
        compared = _depth_comparison(summary, sinks)
        above = {}
        for model, wide in compared.items():
            wins = wide.snapkv > wide.best
            above[model] = bool(wins.all())
            misses = wide[~wins]
            where = ("at every depth" if wins.all() else f"at {int(wins.sum())} of {len(wide)} depths (not at "
                     + ", ".join(f"{d:.2f}" for d in misses.depth.head(6)) + (", ..." if len(misses) > 6 else "") + ")")
            lowest = wide.loc[wide.snapkv.idxmin()]
            lines.append(f"- {model}, {sinks}: SnapKV {wide.snapkv.mean():.2f} averaged over {len(wide)} layers "
                         f"(best reference set {wide.best.mean():.2f}); above the best reference set {where}; "
                         f"lowest {lowest.snapkv:.2f} at depth {lowest.depth:.2f} (layer {int(lowest.layer)}).")
        verdicts[sinks] = above
    for sinks, above in verdicts.items():
        if not above:
            continue
        name = "hit rate" if sinks == "with sinks" else "sink-free hit rate"
        if len(above) > 1 and all(above.values()):
            lines.append(f"**Holds on every model:** SnapKV's {name} is above the best reference set at every depth.")
        elif len(above) > 1 and any(above.values()):
            held = [m for m, ok in above.items() if ok]
            lines.append(f"**Does not hold on every model:** SnapKV's {name} beats the best reference set at every "
                         f"depth on {', '.join(held)} only.")
        elif len(above) > 1:
            lines.append(f"**Holds on no model:** SnapKV's {name} falls to or below the best reference set at some "
                         "depth on every model.")
        else:
            (model, ok), = above.items()
            lines.append(f"Only {model} has data: SnapKV's {name} is {'above' if ok else 'not above'} the best "
                         "reference set at every depth; nothing to compare across models.")
    return "\n".join(lines)
