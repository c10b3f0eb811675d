"""The question-agnostic leaderboard (notebook 14): kvpress's setting, where the context is compressed before the
question exists (as a KV pack is), beside the question-aware one SnapKV was designed for.

x = fraction of the prompt removed (budget = round((1 - fraction) x prompt length), window included), y = accuracy
relative to the full cache on the prompts the full cache answers, one line per method; needle and task suite, both
modes. A tiny-budget needle run asks whether any policy keeps a whole 7-digit value in `tiny_budget` prompt tokens
(window of `tiny_window_size` included), question-agnostic.

    settings -> leaderboard_rows (evaluate per prompt length, rows tagged with `removed`) -> leaderboard_table
    (relative accuracy with 95% intervals) -> leaderboard_figure / leaderboard_reading
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from snapkv.analysis.quality.methods import MODES, Method, check_methods
from snapkv.analysis.quality.prompts import QualityPrompt
from snapkv.analysis.quality.runner import evaluate
from snapkv.analysis.quality.statistics import retention_table
from snapkv.core.registry import KERNEL_SIZE, WINDOW_SIZE, method_policy

FRACTIONS = (0.25, 0.5, 0.75, 0.875)  # kvpress's leaderboard's compression ratios
BASE_METHODS = ("snapkv", "knorm", "expected-attention", "kvzip", "streaming", "random")
WHOLE_UNITS = ("+span", "+boundary")  # the wrappers: a kept token pulls in its unit / the prompt's ends reserved
LEADERBOARD_METHODS = (*BASE_METHODS, *(f"{base}{unit}" for base in ("snapkv", "knorm", "expected-attention", "kvzip")
                                        for unit in WHOLE_UNITS))
# the default profile: each score once, and whole units on the two scores that keep values best
DEFAULT_METHODS = ("snapkv", "knorm", "expected-attention", "kvzip", "knorm+span", "kvzip+span")
TINY = "tiny budget"  # the experiment label of the tiny-budget needle rows


@dataclass(frozen=True)
class LeaderboardSettings:
    """Notebook 14 (paper-scale defaults; DEFAULT and QUICK: what the default and quick profiles change)."""

    methods: tuple[str, ...] = LEADERBOARD_METHODS
    fractions: tuple[float, ...] = FRACTIONS
    modes: tuple[str, ...] = ("question-agnostic", "question-aware")
    needle_lengths: tuple[int, ...] = (1000, 2000, 4000)
    needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_samples: int = 2
    tasks: tuple[str, ...] = ("single_key", "multi_key", "multi_value")
    task_lengths: tuple[int, ...] = (1000, 2000, 4000)
    task_samples: int = 4
    tiny_budget: int = 32  # prompt tokens kept in the tiny-budget needle run (window included)
    tiny_window_size: int = 4  # its window: the last context tokens, of no use before the question
    window_size: int = WINDOW_SIZE
    kernel_size: int = KERNEL_SIZE
    seed: int = 0
    DEFAULT: ClassVar[dict] = dict(methods=DEFAULT_METHODS, fractions=FRACTIONS[1:], needle_lengths=(1000,),
                                   needle_depths=(0.1, 0.5, 0.9), needle_samples=1, tasks=("single_key",),
                                   task_lengths=(1000,), task_samples=2)
    QUICK: ClassVar[dict] = dict(methods=("snapkv", "knorm", "knorm+span"), fractions=(0.5, 0.875),
                                 needle_lengths=(512,), needle_depths=(0.5,), needle_samples=1, tasks=("single_key",),
                                 task_lengths=(512,), task_samples=1)

    def __post_init__(self):
        if "full" in self.methods:
            raise ValueError("methods lists 'full': the full cache is always run (it is the reference)")
        check_methods(self.methods, [self.window_size + 1], [], window_size=self.window_size)  # the names
        if self.tiny_budget:
            check_methods(self.methods, [self.tiny_budget], [], window_size=self.tiny_window_size)
        if not self.fractions or any(not 0 < f < 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1) (the share of the prompt removed), got {self.fractions}")
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise ValueError(f"modes must be some of {MODES}, got {self.modes}")
        for length in (*self.needle_lengths, *self.task_lengths):
            budget = budget_of(length, max(self.fractions))
            if budget <= self.window_size:
                raise ValueError(f"removing {max(self.fractions)} of a {length}-token prompt leaves {budget} tokens, "
                                 f"not more than the window ({self.window_size}): use longer prompts or a smaller "
                                 "fraction")


def budget_of(length: int, fraction: float) -> int:
    """The budget that removes `fraction` of a `length`-token prompt."""
    return round((1 - fraction) * length)


def fraction_methods(methods: Sequence[str], fractions: Sequence[float], length: int, *, window_size: int,
                     kernel_size: int, tokenizer=None) -> tuple[list[Method], dict]:
    """The full cache plus every method at the budget of every fraction of a `length`-token prompt, and
    {budget: fraction} to tag the rows with."""
    grid = [Method("full", None, method_policy("full", None))]
    removed = {}
    for fraction in fractions:
        budget = budget_of(length, fraction)
        removed[budget] = fraction
        grid += [Method(name, budget, method_policy(name, budget, window_size=window_size, kernel_size=kernel_size,
                                                    tokenizer=tokenizer)) for name in methods]
    return grid, removed


def leaderboard_rows(model, tokenizer, needles: Sequence[QualityPrompt], suite: Sequence[QualityPrompt],
                     settings: LeaderboardSettings, *, progress: bool = True) -> pd.DataFrame:
    """Every method at every fraction in every mode on the needle and suite prompts (one shared prefill per
    prompt, per length), then the tiny-budget needle run (question-agnostic). One row per (prompt, mode,
    method, budget), with `experiment` ("needle", "task suite", TINY) and `removed` (NaN for the full cache)."""
    frames = []
    for experiment, prompts in (("needle", needles), ("task suite", suite)):
        for length in sorted({p.length for p in prompts}):
            group = [p for p in prompts if p.length == length]
            grid, removed = fraction_methods(settings.methods, settings.fractions, length,
                                             window_size=settings.window_size, kernel_size=settings.kernel_size,
                                             tokenizer=tokenizer)
            table = evaluate(model, tokenizer, group, grid, modes=settings.modes, progress=progress)
            frames.append(table.assign(experiment=experiment, removed=table.budget.map(removed).astype(float)))
    if settings.tiny_budget and needles:
        grid = [Method("full", None, method_policy("full", None))] + [
            Method(name, settings.tiny_budget, method_policy(name, settings.tiny_budget,
                                                             window_size=settings.tiny_window_size,
                                                             kernel_size=settings.kernel_size, tokenizer=tokenizer))
            for name in settings.methods]
        table = evaluate(model, tokenizer, needles, grid, modes=("question-agnostic",), progress=progress)
        frames.append(table.assign(experiment=TINY, removed=np.nan))
    return pd.concat(frames, ignore_index=True)


def answered(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the prompts (per experiment and mode) the full cache answers (score 1)."""
    keys = ["experiment", "task", "length", "depth", "sample", "mode"]
    frame = rows.assign(depth=rows.depth.astype(float).fillna(-1.0))
    solved = frame[(frame.method == "full") & (frame.score == 1.0)][keys]
    return frame.merge(solved, on=keys, how="inner").assign(depth=lambda f: f.depth.where(f.depth >= 0))


def leaderboard_caption(rows: pd.DataFrame, label: str) -> str:
    """The figure's caption: the model and, per experiment, how many prompts the full cache answers (its n)."""
    solved = answered(rows[rows.experiment != TINY]).drop_duplicates(["experiment", "task", "length", "depth",
                                                                      "sample"])
    return f"{label}, " + ", ".join(f"{experiment}: {n} prompts the full cache answers"
                                    for experiment, n in solved.groupby("experiment", sort=False).size().items())


def leaderboard_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Accuracy relative to the full cache, on the prompts it answers, per (experiment, mode, method, removed,
    budget), with a paired 95% bootstrap interval (`retention_table`); `prompts` is n."""
    solved = answered(rows)
    frames = []
    for experiment, part in solved.groupby("experiment", sort=False):
        table = retention_table(part.assign(removed=part.removed.fillna(-1.0)),
                                by=("mode", "method", "removed", "budget"))
        frames.append(table.assign(experiment=experiment, removed=table.removed.where(table.removed >= 0)))
    if not frames:
        return pd.DataFrame(columns=["experiment", "mode", "method", "removed", "budget", "retention", "ci_low",
                                     "ci_high", "prompts"])
    return pd.concat(frames, ignore_index=True)[["experiment", "mode", "method", "removed", "budget", "score",
                                                 "retention", "ci_low", "ci_high", "prompts"]]


def _method_order(methods) -> list[str]:
    """Base methods in LEADERBOARD_METHODS order, each followed by its whole-unit variants; others after, sorted."""
    known = [m for m in LEADERBOARD_METHODS if m in set(methods)]
    return known + sorted(set(methods) - set(known))


def leaderboard_figure(table: pd.DataFrame, caption: str):
    """Relative accuracy against the fraction removed: one row of panels per experiment (needle, task suite), one
    column per mode, one colour per base method (line style: plain, +span, +boundary), 95% bands. table:
    `leaderboard_table` (the tiny-budget rows are left out: they are one point per method)."""
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    import seaborn as sns
    from matplotlib.colors import to_hex
    from plotly.subplots import make_subplots

    data = table[table.experiment != TINY]
    experiments = list(dict.fromkeys(data.experiment))
    modes = [m for m in ("question-agnostic", "question-aware") if m in set(data["mode"])]
    methods = _method_order(data.method.unique())
    bases = list(dict.fromkeys(m.split("+")[0] for m in methods))
    palette = dict(zip(bases, sns.color_palette("tab10", len(bases))))
    styles = {"": ("-", "solid", "o"), "+span": ("--", "dash", "s"), "+boundary": (":", "dot", "^")}
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(len(experiments), len(modes), figsize=(5.2 * len(modes) + 2, 3.8 * len(experiments)),
                             squeeze=False, sharey=True)
    titles = [f"{e}: {m}" for e in experiments for m in modes]
    interactive = make_subplots(rows=len(experiments), cols=len(modes), subplot_titles=titles,
                                horizontal_spacing=0.06, vertical_spacing=0.12)
    for row, experiment in enumerate(experiments):
        for column, mode in enumerate(modes):
            ax = axes[row][column]
            part = data[(data.experiment == experiment) & (data["mode"] == mode)]
            for method in methods:
                group = part[part.method == method].sort_values("removed")
                if group.empty:
                    continue
                base, unit = method.split("+")[0], ("+" + method.split("+")[1] if "+" in method else "")
                line, dash, marker = styles.get(unit, ("-.", "dashdot", "D"))
                color = palette[base]
                n = int(group.prompts.max())
                x = group.removed + 0.006 * (methods.index(method) - (len(methods) - 1) / 2)  # equal lines stay visible
                ax.plot(x, group.retention, linestyle=line, marker=marker, markersize=4, color=color,
                        label=method)
                if not unit:
                    ax.fill_between(x, group.ci_low, group.ci_high, color=color, alpha=0.1)
                interactive.add_trace(go.Scatter(
                    x=x, y=group.retention, customdata=group.removed, mode="lines+markers", name=method,
                    legendgroup=method,
                    showlegend=row == 0 and column == 0, line={"color": to_hex(color), "dash": dash},
                    error_y={"type": "data", "symmetric": False, "array": group.ci_high - group.retention,
                             "arrayminus": group.retention - group.ci_low},
                    hovertemplate=f"{method}<br>removed %{{customdata}}<br>relative accuracy %{{y:.2f}} (n = {n})"
                                  "<extra></extra>"), row=row + 1, col=column + 1)
            n = int(part.prompts.max()) if len(part) else 0
            ax.set(title=f"{experiment}: {mode} (n = {n})", xlabel="fraction of the prompt removed",
                   ylabel="accuracy relative to the full cache", ylim=(-0.02, 1.08),
                   xticks=sorted(data.removed.unique()))
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            interactive.update_xaxes(title_text="fraction removed", row=row + 1, col=column + 1)
            interactive.update_yaxes(range=[-0.02, 1.08], title_text="relative accuracy" if column == 0 else None,
                                     row=row + 1, col=column + 1)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle(f"Question-agnostic leaderboard ({caption})", fontsize=11)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.92))
    interactive.update_layout(title=f"Question-agnostic leaderboard ({caption})", height=380 * len(experiments) + 120)
    return fig, interactive


def _ranking(part: pd.DataFrame) -> pd.Series:
    """Mean relative accuracy over the fractions per method, best first."""
    return part.groupby("method").retention.mean().sort_values(ascending=False, kind="stable")


def _best(ranking: pd.Series) -> str:
    """The methods tied at the top of a ranking, joined with " = "."""
    return " = ".join(ranking.index[np.isclose(ranking, ranking.iloc[0])])


def leaderboard_reading(table: pd.DataFrame, enough: float = 0.9) -> str:
    """Notebook 14: per experiment and mode, the best method (mean relative accuracy over the fractions) and the
    methods at >= `enough` of the full cache when 75% of the prompt is removed; whether whole-unit keeping
    changes the ranking (the best with and without the +span/+boundary variants, and each base against its
    variants); the tiny-budget needle's share per method."""
    lines = []
    data = table[table.experiment != TINY]
    for (experiment, mode), part in data.groupby(["experiment", "mode"], sort=False):
        ranking = _ranking(part)
        plain = ranking[[("+" not in m) for m in ranking.index]]
        n = int(part.prompts.max())
        if ranking.iloc[0] == 0:
            lines.append(f"- **{experiment}, {mode}** (n = {n}): no method answers any prompt at any fraction.")
            continue
        text = (f"- **{experiment}, {mode}** (n = {n}): best {_best(ranking)} ({ranking.iloc[0]:.2f} of the full "
                f"cache, mean over the fractions)")
        if len(plain) and set(_best(plain).split(" = ")) != set(_best(ranking).split(" = ")):
            text += f"; without whole-unit keeping the best is {_best(plain)} ({plain.iloc[0]:.2f})"
        elif len(plain):
            text += "; whole-unit keeping does not change the best"
        at = part[np.isclose(part.removed, 0.75)]
        good = at[at.retention >= enough].sort_values("retention", ascending=False)
        if len(at):
            text += (f"; at 75% removed, >= {enough:.0%} of the full cache: "
                     + (", ".join(f"{r.method} {r.retention:.2f}" for r in good.itertuples()) if len(good) else "none"))
        gains = []
        for base in plain.index:
            for unit in WHOLE_UNITS:
                if base + unit in ranking.index:
                    gains.append(f"{base}{unit} {ranking[base + unit] - ranking[base]:+.2f}")
        if gains:
            text += "; whole units against the plain score: " + ", ".join(gains)
        lines.append(text + ".")
    tiny = table[table.experiment == TINY]
    if len(tiny):
        part = tiny.sort_values("retention", ascending=False)
        budget = int(part.budget.dropna().iloc[0])
        lines.append(f"- **Tiny budget** ({budget} prompt tokens kept, its window included, question-agnostic, n = "
                     f"{int(part.prompts.max())} needles the full cache answers): "
                     + ", ".join(f"{r.method} {r.retention:.2f}" for r in part.itertuples()) + ".")
    return "\n".join(lines) if lines else "No prompt was answered by the full cache: nothing to rank."

