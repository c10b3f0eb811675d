"""Cluster width (issue #17, notebook 10): how wide must the clusters SnapKV keeps be for a needle's value to
survive compression, and what does the width cost?

SnapKV max-pools the observation window's votes along positions (kernel k, stride 1) before its top-k: a vote
for one token lifts the k // 2 tokens on either side of it, so the kept positions come in clusters about k
tokens wide. A 7-digit value is 7 tokens on SmolLM2 (one per digit); with kernel 5 each head keeps a different
part of it, and the model, which copies the number digit by digit, stops at the first digit too few heads hold.

The sweep runs SnapKV at every kernel of `ClusterWidthSettings` (x budget x observation window, a subset at
the other windows) on needle prompts, on the retrieval tasks of the suite and on notebook 01's observation
hit rate with pooled votes, all from one shared prefill per prompt (`runner.answers_with_shared_prefill`):

    sweep_grid -> needle_sweep / task_sweep / pooled_hit_rate  (tidy tables)
               -> accuracy_by_kernel / value_retention_by_kernel / hit_rate_by_kernel  (summaries)
               -> needle_width_reading / hit_rate_width_reading  (the verdicts, computed here)
               -> cluster_width_plots  (one function per figure)
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from snapkv import FullCache, SnapKV
from snapkv.analysis.observation.attention import teacher_forced_attention
from snapkv.analysis.observation.experiments import run_over_samples
from snapkv.analysis.observation.metrics import metric_records, pool, sink_positions, summarize, voted_set
from snapkv.analysis.quality.methods import Method, check_lengths_fit
from snapkv.analysis.quality.prompts import NEEDLE_FORMATS, TASKS, QualityPrompt
from snapkv.analysis.quality.runner import DEFAULT_PREFILL_CHUNK, evaluate, method_answers, needle_tokens
from snapkv.analysis.quality.scoring import prefix_score, score_answer
from snapkv.analysis.quality.statistics import with_full_score
from snapkv.analysis.text import chat_ids, chat_request
from snapkv.core import check_int
from snapkv.core.registry import KERNEL_SIZE
from snapkv.core.selection import GQA_MODES, POOLINGS

KERNEL_SIZES = (1, 3, 5, 7, 11, 15, 21, 31, 63)
PAPER_KERNEL = KERNEL_SIZE  # the paper's needle setting (registry.WINDOW_SIZE, KERNEL_SIZE; maxpool)
ANSWERED = "full cache answers"  # the cells of a summary where the full cache answers the prompt
ALL_PROMPTS = "all prompts"
RETENTION_MEASURES = {"value_kept": "every value token", "value_token_share": "mean value token"}
ENOUGH = 0.9  # accuracy (on prompts the full cache answers) a kernel needs to count as "enough" in the reading
STILL_PREDICTIVE = 0.05  # a sink-free hit rate that falls less than this (paper kernel -> needle width) "stays"


@dataclass(frozen=True)
class ClusterWidthSettings:
    """Notebook 10's sweep (paper scale); DEFAULT and QUICK: what the default and quick profiles change.

    Every kernel x budget runs at `window_size`; each of `other_window_sizes` runs `other_kernel_sizes` x
    `other_budgets` (the full product of 9 kernels x 4 budgets x 3 windows would take an hour here). The task
    suite runs `task_kernel_sizes` at `window_size` plus the other windows' subset."""

    kernel_sizes: tuple[int, ...] = KERNEL_SIZES
    budgets: tuple[int, ...] = (128, 256, 512, 1024)
    window_size: int = 16  # the paper's needle window: the whole kernel x budget product runs here
    other_window_sizes: tuple[int, ...] = (32, 64)
    other_kernel_sizes: tuple[int, ...] = (5, 15, 31)
    other_budgets: tuple[int, ...] = (256, 512)
    pooling: str = "maxpool"
    gqa: str = "mean"
    needle_lengths: tuple[int, ...] = (2000,)  # the full cache answers every needle up to 2K on SmolLM2
    needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_samples: int = 2  # needles per length, each at every depth
    needle_format: str = "number"
    tasks: tuple[str, ...] = ("single_key", "multi_key")  # the retrieval tasks the full cache solves at 2K
    task_lengths: tuple[int, ...] = (2000,)
    task_samples: int = 3
    task_kernel_sizes: tuple[int, ...] = (1, 5, 15, 31, 63)
    seed: int = 0
    hit_rate_samples: int = 3  # notebook 01's chat prompts, shortest first
    hit_rate_context_tokens: int | None = 1500
    answer_tokens: int = 128  # reference answer tokens (teacher-forced) whose attention the votes must predict
    top_k: float = 0.05  # notebook 01's voted set: this fraction of the prompt
    threshold: float = 0.05
    DEFAULT: ClassVar[dict] = dict(kernel_sizes=(1, 5, 31), budgets=(128, 512), other_window_sizes=(32,),
                                   other_kernel_sizes=(5, 31), other_budgets=(256,), needle_samples=2,
                                   task_samples=2, task_kernel_sizes=(5, 31), hit_rate_samples=2)
    QUICK: ClassVar[dict] = dict(kernel_sizes=(5, 31), budgets=(128,), other_window_sizes=(32,),
                                 other_kernel_sizes=(5,), other_budgets=(128,), needle_lengths=(512,),
                                 needle_depths=(0.5,), needle_samples=2, tasks=("single_key",), task_lengths=(512,),
                                 task_samples=1, task_kernel_sizes=(5, 31), hit_rate_samples=1,
                                 hit_rate_context_tokens=400, answer_tokens=16)


def _check_kernels(name: str, kernels) -> list[int]:
    kernels = list(kernels)
    if not kernels:
        raise ValueError(f"{name} is empty: give at least one odd pooling kernel, e.g. (5, 15, 31)")
    for kernel in kernels:
        if check_int(name, kernel, 1) % 2 == 0:
            raise ValueError(f"{name} must hold odd kernels (pooling keeps positions aligned), got {kernel}")
    return kernels


def check_settings(settings: ClusterWidthSettings) -> None:
    """Raise TypeError/ValueError for settings the sweep cannot run, before any model work: even or empty
    kernels, a budget not above its window or not below the shortest prompt, unknown pooling/GQA/task/format."""
    s = settings
    _check_kernels("kernel_sizes", s.kernel_sizes)
    _check_kernels("task_kernel_sizes", s.task_kernel_sizes)
    if s.other_window_sizes:
        _check_kernels("other_kernel_sizes", s.other_kernel_sizes)
    if not s.budgets:
        raise ValueError("budgets is empty: give at least one budget, e.g. (128, 256)")
    if s.pooling not in POOLINGS or s.pooling == "none":
        raise ValueError(f"pooling must be maxpool or avgpool (the sweep varies its kernel), got {s.pooling!r}")
    if s.gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {GQA_MODES}, got {s.gqa!r}")
    if s.needle_format not in NEEDLE_FORMATS:
        raise ValueError(f"unknown needle_format {s.needle_format!r}: choose one of {NEEDLE_FORMATS}")
    unknown = [t for t in s.tasks if t not in TASKS or t == "code_completion"]
    if unknown:
        raise ValueError(f"unknown or unscored task(s) {unknown}: choose retrieval tasks from {TASKS[:-1]}")
    pairs = [(s.window_size, b) for b in s.budgets] + [(w, b) for w in s.other_window_sizes for b in s.other_budgets]
    for window, budget in pairs:
        check_int("window_size", window, 1)
        if check_int("budget", budget, 1) <= window:
            raise ValueError(f"budget {budget} must exceed the observation window ({window} tokens): the budget "
                             "includes the window")
    shortest = min([*s.needle_lengths, *(s.task_lengths if s.tasks else ())], default=0)
    largest = max(budget for _, budget in pairs)
    if shortest <= largest:
        raise ValueError(f"budget {largest} does not compress a {shortest}-token prompt: use prompt lengths above "
                         "the largest budget")
    for name in ("needle_samples", "task_samples", "hit_rate_samples", "answer_tokens"):
        check_int(name, getattr(s, name), 1)


def method_name(window_size: int, kernel_size: int) -> str:
    """The sweep's name of SnapKV at one window and kernel, e.g. "snapkv-w16-k5"."""
    return f"snapkv-w{window_size}-k{kernel_size}"


def sweep_grid(settings: ClusterWidthSettings, kernel_sizes: Sequence[int] | None = None) -> list[Method]:
    """The full cache, then SnapKV at every (kernel, budget) of the main window and every (other kernel, other
    budget) of the other windows; `kernel_sizes` replaces the main window's kernels (the task suite's subset)."""
    s = settings
    kernels = s.kernel_sizes if kernel_sizes is None else kernel_sizes
    settings_run = [(s.window_size, k, b) for k in kernels for b in s.budgets]
    settings_run += [(w, k, b) for w in s.other_window_sizes for k in s.other_kernel_sizes for b in s.other_budgets]
    grid = [Method("full", None, FullCache())]
    for window, kernel, budget in dict.fromkeys(settings_run):
        grid.append(Method(method_name(window, kernel), budget,
                           SnapKV(window_size=window, max_capacity_prompt=budget, kernel_size=kernel,
                                  pooling=s.pooling, gqa=s.gqa)))
    return grid


def with_policy_columns(table: pd.DataFrame, methods: Sequence[Method]) -> pd.DataFrame:
    """`table` (one row per method name) with window_size and kernel_size (<NA> for the full cache)."""
    settings = {m.name: (getattr(m.policy, "window_size", None), getattr(m.policy, "kernel_size", None))
                for m in methods if isinstance(m.policy, SnapKV)}
    return table.assign(window_size=pd.array([settings.get(n, (None, None))[0] for n in table.method], "Int64"),
                        kernel_size=pd.array([settings.get(n, (None, None))[1] for n in table.method], "Int64"))


# -- which tokens of the value survive ------------------------------------------------------------------------


def kept_by_pair(positions: Sequence[int], kept_positions: dict) -> torch.Tensor:
    """bool (compressed layers x heads, len(positions)): whether each (layer, cache head) pair keeps each prompt
    position; kept_positions {layer: (1, heads, kept)} as in `runner.GeneratedAnswer` (empty: nothing evicted,
    an empty (0, n) tensor)."""
    wanted = torch.as_tensor(list(positions), dtype=torch.long)
    if not kept_positions:
        return torch.zeros(0, len(wanted), dtype=torch.bool)
    return torch.cat([(kept[0].cpu()[:, :, None] == wanted).any(1) for kept in kept_positions.values()])


def value_retention(tokens: pd.DataFrame, kept_positions: dict) -> dict:
    """How much of a needle's value one compressed cache keeps: value_kept = the share of (layer, KV head) pairs
    that keep EVERY token of the value (what the model needs to copy it whole), value_token_share = the mean over
    the value's tokens of the share of pairs keeping it (`runner.needle_retention`'s kept_share, averaged),
    value_tokens = how many tokens the value has; both shares are 1.0 when nothing was evicted.
    tokens: `runner.needle_tokens` of the prompt."""
    value = tokens.position[tokens.in_value].tolist()
    if not value:
        raise ValueError("the needle's tokens hold no value token (in_value is all False)")
    held = kept_by_pair(value, kept_positions)
    if held.shape[0] == 0:
        return dict(value_tokens=len(value), value_kept=1.0, value_token_share=1.0)
    return dict(value_tokens=len(value), value_kept=float(held.all(1).float().mean()),
                value_token_share=float(held.float().mean()))


# -- experiments ----------------------------------------------------------------------------------------------


def needle_sweep(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *,
                 prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK, progress: bool = True) -> pd.DataFrame:
    """Every method on every needle prompt (question-aware, one shared prefill per prompt): one row per (prompt,
    method) with task, length, prompt_tokens, depth, sample, mode, method, budget, window_size, kernel_size,
    score, correct, prefix_score, answer, expected and the columns of `value_retention`. Methods whose budget
    is >= the prompt's length are skipped, as in `runner.evaluate`."""
    if not prompts or not methods:
        raise ValueError("needle_sweep needs at least one needle prompt and one method")
    check_lengths_fit({p.length for p in prompts}, model, max(p.max_new_tokens for p in prompts))
    tokens = {id(prompt): needle_tokens(tokenizer, prompt) for prompt in prompts}  # raises for a non-needle prompt
    rows = []
    for prompt, mode, name, budget, text, answer, _ in method_answers(
            model, tokenizer, prompts, methods, modes=("question-aware",), desc="needle prompts",
            prefill_chunk_size=prefill_chunk_size, progress=progress):
        score, correct = score_answer(prompt, text)
        rows.append(dict(task=prompt.task, length=prompt.length, prompt_tokens=prompt.prompt_tokens,
                         depth=prompt.depth, sample=prompt.sample, mode=mode, method=name, budget=budget,
                         score=score, correct=correct, prefix_score=prefix_score(text, prompt.expected[0]),
                         answer=text, expected=prompt.expected[0],
                         **value_retention(tokens[id(prompt)], answer.kept_positions)))
    table = pd.DataFrame.from_records(rows)
    table["budget"] = table["budget"].astype("Int64")
    return with_policy_columns(table, methods)


def task_sweep(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *,
               prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK, progress: bool = True) -> pd.DataFrame:
    """`runner.evaluate` (question-aware) on task prompts, with the window_size and kernel_size of each method."""
    table = evaluate(model, tokenizer, prompts, methods, prefill_chunk_size=prefill_chunk_size, progress=progress)
    return with_policy_columns(table, methods)


def voted_runs(voted: torch.Tensor) -> tuple[int, int]:
    """(voted positions, contiguous runs of them) summed over batch rows and heads of a bool (batch, heads, n)
    voted set: voted / runs is the mean width of the clusters the set is made of."""
    starts = voted[..., 1:] & ~voted[..., :-1]
    return int(voted.sum()), int(starts.sum() + voted[..., 0].sum())


def pooled_hit_rate(model, tokenizer, samples: list[dict], settings: ClusterWidthSettings) -> pd.DataFrame:
    """Notebook 01's observation hit rate with pooled votes: each chat sample's reference answer (its first
    `answer_tokens` tokens) is teacher-forced after the prompt (context cut to `hit_rate_context_tokens`), and
    the voted set (top `top_k` of the prompt, `gqa` per KV group as SnapKV's policy) is made with every window of
    the sweep and every kernel of that window. One row per (sample, layer, window_size, kernel_size) with the
    counts and ratios of `metrics.metric_records` (hits, important, hit_rate, hit_rate_no_sinks, mass_recall,
    ...) plus voted and runs (see `voted_runs`)."""
    s = settings
    runs = [(s.window_size, k) for k in s.kernel_sizes]
    runs += [(w, k) for w in s.other_window_sizes for k in s.other_kernel_sizes]
    largest = max(w for w, _ in runs)
    kv_heads = model.config.get_text_config().num_key_value_heads

    def measure(sample):
        prompt = chat_ids(tokenizer, chat_request(sample, tokenizer, s.hit_rate_context_tokens))
        answer = tokenizer(sample["response"], add_special_tokens=False).input_ids[: s.answer_tokens]
        if len(answer) < s.answer_tokens:
            raise ValueError(f"sample {sample.get('id')!r} has {len(answer)} reference answer tokens, fewer than "
                             f"answer_tokens ({s.answer_tokens}): lower answer_tokens")
        if len(prompt) <= largest + int(s.top_k * len(prompt)):
            raise ValueError(f"a {len(prompt)}-token prompt is too short for window {largest}: use longer prompts")
        observations, generated = teacher_forced_attention(model, torch.tensor([prompt + answer]), len(prompt),
                                                           largest)
        records = []
        for layer in observations:
            for window, kernel in dict.fromkeys(runs):
                observation = observations[layer][..., -window:, :]
                voted = voted_set(observation, s.top_k, kernel_size=kernel, gqa=s.gqa, kv_heads=kv_heads)
                count, clusters = voted_runs(voted)
                records += [r | dict(voted=count, runs=clusters) for r in metric_records(
                    generated[layer], {"snapkv": [voted]}, sink_positions(observation), window=window,
                    threshold=s.threshold, generation_window=s.answer_tokens, layer=layer, window_size=window,
                    kernel_size=kernel)]
        yield pd.DataFrame.from_records(records), dict(prompt_tokens=len(prompt))

    table = run_over_samples(measure, samples, desc="hit rate samples")
    return table[["sample", *table.columns.drop("sample")]]


# -- summaries ------------------------------------------------------------------------------------------------


def accuracy_by_kernel(table: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """Mean score (95% bootstrap interval over prompts) per (window_size, kernel_size, budget), on all prompts
    and on the prompts the full cache answers (`cells`); full_cache = the full cache's mean on the same cells.
    table: `needle_sweep` or `task_sweep`; experiment: its label ("needle", "task suite")."""
    paired = with_full_score(table)
    paired = paired.assign(window_size=paired.window_size.astype(int), kernel_size=paired.kernel_size.astype(int))
    frames = []
    for cells, part in ((ALL_PROMPTS, paired), (ANSWERED, paired[paired.full_score == 1.0])):
        if part.empty:
            continue
        summary = summarize(part.assign(budget=part.budget.astype(int)), ["window_size", "kernel_size", "budget"],
                            "score")
        frames.append(summary.assign(experiment=experiment, cells=cells, full_cache=float(
            part.drop_duplicates(["task", "length", "depth", "sample"]).full_score.mean())))
    if not frames:
        raise ValueError("the table has no compressed rows paired with a full-cache row")
    return pd.concat(frames, ignore_index=True)[
        ["experiment", "cells", "window_size", "kernel_size", "budget", "mean", "ci_low", "ci_high", "samples",
         "full_cache"]]


def value_retention_by_kernel(table: pd.DataFrame) -> pd.DataFrame:
    """From `needle_sweep`: per (measure, window_size, kernel_size, budget) the mean over prompts (95% bootstrap
    interval) of value_kept ("every value token") and value_token_share ("mean value token")."""
    part = table[table.method != "full"]
    long = part.melt(id_vars=["window_size", "kernel_size", "budget", "length", "depth", "sample"],
                     value_vars=list(RETENTION_MEASURES), var_name="measure")
    long = long.assign(measure=long.measure.map(RETENTION_MEASURES), window_size=long.window_size.astype(int),
                       kernel_size=long.kernel_size.astype(int), budget=long.budget.astype(int))
    return summarize(long, ["measure", "window_size", "kernel_size", "budget"], "value")


HIT_RATE_MEASURES = {"hit_rate": "hit rate", "hit_rate_no_sinks": "hit rate without sinks",
                     "mass_recall": "attention-mass recall", "cluster_width": "mean cluster width (tokens)"}


def hit_rate_by_kernel(table: pd.DataFrame) -> pd.DataFrame:
    """From `pooled_hit_rate`: per (measure, window_size, kernel_size) the mean over samples (95% bootstrap
    interval) of the hit rate, the sink-free hit rate and the mass recall (all layers and heads pooled per
    sample, `metrics.pool`) and of the mean cluster width (voted positions / contiguous runs)."""
    by = ["sample", "window_size", "kernel_size"]
    pooled = pool(table, by)
    widths = table.groupby(by, as_index=False)[["voted", "runs"]].sum()
    pooled = pooled.merge(widths, on=by).assign(cluster_width=lambda f: f.voted / f.runs)
    long = pooled.melt(id_vars=by, value_vars=list(HIT_RATE_MEASURES), var_name="measure")
    long = long.assign(measure=long.measure.map(HIT_RATE_MEASURES))
    return summarize(long, ["measure", "window_size", "kernel_size"], "value")


# -- readings -------------------------------------------------------------------------------------------------


def needed_kernel(accuracy: pd.DataFrame, enough: float = ENOUGH) -> pd.DataFrame:
    """Per (experiment, cells, window_size, budget): the paper's kernel's accuracy, the best kernel and its
    accuracy, and `needed` = the smallest kernel whose accuracy is >= `enough` x the full cache's on those
    cells (<NA> when none is)."""
    records = []
    for key, group in accuracy.groupby(["experiment", "cells", "window_size", "budget"], sort=True):
        group = group.sort_values("kernel_size")
        means = group.set_index("kernel_size")["mean"]
        target = enough * group.full_cache.iloc[0]
        reached = means[means >= target] if target > 0 else means.iloc[0:0]
        records.append(dict(zip(["experiment", "cells", "window_size", "budget"], key),
                            paper=means.get(PAPER_KERNEL, float("nan")), best_kernel=int(means.idxmax()),
                            best=float(means.max()), needed=int(reached.index[0]) if len(reached) else pd.NA,
                            target=target, prompts=int(group.samples.max())))
    table = pd.DataFrame.from_records(records)
    table["needed"] = table.needed.astype("Int64")
    return table


def _retention_at(retention: pd.DataFrame, window: int, kernel, budget: int) -> float:
    row = retention[(retention.measure == RETENTION_MEASURES["value_kept"]) & (retention.window_size == window)
                    & (retention.kernel_size == kernel) & (retention.budget == budget)]
    return float(row["mean"].iloc[0]) if len(row) else float("nan")


def chosen_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the cells the full cache answers when there are any, else those of all prompts."""
    return frame[frame.cells == (ANSWERED if (frame.cells == ANSWERED).any() else ALL_PROMPTS)]


def needle_width(accuracy: pd.DataFrame, window_size: int, enough: float = ENOUGH) -> int | None:
    """The smallest kernel that is enough (accuracy >= `enough` x the full cache's, on the needle prompts the full
    cache answers) at every budget run at `window_size`; None when no kernel is. accuracy: `accuracy_by_kernel`."""
    part = chosen_cells(accuracy[(accuracy.experiment == "needle") & (accuracy.window_size == window_size)])
    if part.empty:
        return None
    part = part.assign(ok=part["mean"] >= enough * part.full_cache)
    by_kernel = part.groupby("kernel_size").agg(ok=("ok", "all"), budgets=("budget", "nunique"))
    good = by_kernel[by_kernel.ok & (by_kernel.budgets == part.budget.nunique())]
    return int(good.index.min()) if len(good) else None


def _compared(value: int, reference: int) -> str:
    return "more than" if value > reference else "as many as" if value == reference else "fewer than"


def needle_width_reading(accuracy: pd.DataFrame, retention: pd.DataFrame, value_tokens: int, window_size: int,
                         enough: float = ENOUGH) -> str:
    """Notebook 10: per budget (at `window_size`), on the needle prompts the full cache answers, SnapKV's accuracy
    with the paper's kernel against the smallest kernel that is enough (>= `enough` of the full cache) and the
    share of (layer, KV head) pairs keeping the whole value at both; then the width the needle needs
    (`needle_width`) and why (how many tokens a max-pooled vote lifts on either side of a voted token against the
    value's length, and how often the whole value is kept), kernels too wide for a budget, and the task suite at
    the paper's kernel and at that width. accuracy: `accuracy_by_kernel` of the needle (and the suite) stacked;
    retention: `value_retention_by_kernel`; value_tokens: the value's length in tokens (e.g. the median of
    `needle_sweep`'s value_tokens)."""
    needs = needed_kernel(accuracy, enough)
    needle = chosen_cells(needs[(needs.experiment == "needle") & (needs.window_size == window_size)])
    needle = needle.sort_values("budget")
    if needle.empty:
        return f"No needle rows at window {window_size}: nothing to read."
    cells = needle.cells.iloc[0]
    lines = [f"Needle prompts ({cells}; window {window_size}; up to {needle.prompts.max()} prompts per cell; "
             f"'enough' = accuracy >= {enough:.0%} of the full cache's):"]
    for row in needle.itertuples():
        paper = (f"kernel {PAPER_KERNEL} {row.paper:.2f} (whole value kept by "
                 f"{_retention_at(retention, window_size, PAPER_KERNEL, row.budget):.0%} of the (layer, KV head) "
                 "pairs)") if pd.notna(row.paper) else f"kernel {PAPER_KERNEL} not run"
        if pd.isna(row.needed):
            found = f"no kernel is enough (best: kernel {row.best_kernel}, {row.best:.2f})"
        else:
            reached = _accuracy_at(accuracy, cells, window_size, row.needed, row.budget)
            found = (f"smallest enough kernel {row.needed} ({reached:.2f}; whole value kept by "
                     f"{_retention_at(retention, window_size, row.needed, row.budget):.0%})")
        lines.append(f"- budget {row.budget}: {paper}; {found}.")
    width = needle_width(accuracy, window_size, enough)
    if width is None:
        lines.append("**No kernel run is enough at every budget**: where none is, the budget, not the cluster "
                     "width, is the limit.")
        return "\n".join(lines)
    lines.append(f"**Width the needle needs:** kernel {width}, the smallest that is enough at every budget run "
                 f"({', '.join(map(str, needle.budget))}). The value is {value_tokens} tokens long; kernel {width} "
                 f"lifts {width // 2} tokens on either side of each voted token, "
                 f"{_compared(width // 2, value_tokens - 1)} the {value_tokens - 1} between the value's first and last "
                 "token.")
    wide = pd.Series([_retention_at(retention, window_size, width, b) for b in needle.budget]).mean()
    paper = pd.Series([_retention_at(retention, window_size, PAPER_KERNEL, b) for b in needle.budget]).mean()
    if wide > paper:
        lines.append(f"Why: at kernel {width} {wide:.0%} of the (layer, KV head) pairs keep the whole value (mean over "
                     f"budgets) against {paper:.0%} at kernel {PAPER_KERNEL}. The model copies the value token by "
                     "token, so it needs every token in the heads that read it; narrow clusters leave each head a "
                     "different part of the value, wide ones keep it whole around one vote.")
    elif pd.notna(paper):
        lines.append(f"The share of pairs keeping the whole value does not explain it here ({wide:.0%} at kernel "
                     f"{width}, {paper:.0%} at kernel {PAPER_KERNEL}).")
    part = chosen_cells(accuracy[(accuracy.experiment == "needle") & (accuracy.window_size == window_size)])
    too_wide = part[(part.kernel_size > width) & (part["mean"] < enough * part.full_cache)].sort_values(
        ["budget", "kernel_size"])
    if len(too_wide):
        lines.append("Wider is not always better: " + ", ".join(
            f"kernel {r.kernel_size} scores {r.mean:.2f} at budget {r.budget}" for r in too_wide.itertuples())
            + " (a small budget holds fewer wide clusters).")
    suite = chosen_cells(accuracy[(accuracy.experiment == "task suite") & (accuracy.window_size == window_size)])
    kernels = sorted(suite.kernel_size.unique())
    if kernels:
        at = next((k for k in kernels if k >= width), kernels[-1])
        cells = suite.cells.iloc[0]

        def task(kernel: int, budget: int) -> str:
            return f"kernel {kernel} {_accuracy_at(accuracy, cells, window_size, kernel, budget, 'task suite'):.2f}"

        parts = [f"budget {b}: {task(PAPER_KERNEL, b)}, {task(at, b)}" for b in sorted(suite.budget.unique())]
        lines.append(f"Task suite ({cells}, window {window_size}): " + "; ".join(parts) + ".")
    return "\n".join(lines)


def _accuracy_at(accuracy: pd.DataFrame, cells: str, window: int, kernel: int, budget: int,
                 experiment: str = "needle") -> float:
    row = accuracy[(accuracy.experiment == experiment) & (accuracy.cells == cells) & (accuracy.window_size == window)
                   & (accuracy.kernel_size == kernel) & (accuracy.budget == budget)]
    return float(row["mean"].iloc[0]) if len(row) else float("nan")


def hit_rate_width_reading(summary: pd.DataFrame, window_size: int, width: int | None = None,
                           change: float = STILL_PREDICTIVE) -> str:
    """Notebook 10: at `window_size`, the observation hit rate (with and without sinks), the attention-mass recall
    and the mean cluster width of the voted set at the narrowest kernel, the paper's, `width` (the needle's, from
    `needle_width`) and the widest; then whether going from the paper's kernel to `width` (without one, from the
    narrowest to the widest kernel) keeps the voted set predictive (its sink-free hit rate falls less than
    `change`) or buys contiguity with prediction. summary: `hit_rate_by_kernel`."""
    part = summary[summary.window_size == window_size]
    if part.empty:
        return f"No hit-rate rows at window {window_size}: nothing to read."
    run = sorted(part.kernel_size.unique())
    shown = sorted({run[0], run[-1], *(k for k in (PAPER_KERNEL, width) if k in run)})
    value = part.set_index(["measure", "kernel_size"])["mean"]

    def at(measure: str, kernel: int) -> float:
        return float(value.get((HIT_RATE_MEASURES[measure], kernel), float("nan")))

    def series(measure: str, digits: int = 2) -> str:
        return " / ".join(f"{at(measure, k):.{digits}f}" for k in shown)

    lines = [f"Observation hit rate with pooled votes (window {window_size}, notebook 01's voted set: top "
             f"5% of the prompt; {int(part.samples.max())} samples), kernel {' / '.join(map(str, shown))}: hit rate "
             f"{series('hit_rate')}, without sinks {series('hit_rate_no_sinks')}, attention-mass recall "
             f"{series('mass_recall')}; mean width of the voted set's clusters {series('cluster_width', 1)} tokens."]
    start, end = (PAPER_KERNEL, width) if width in run and PAPER_KERNEL in run and width > PAPER_KERNEL else (
        run[0], run[-1])
    drop = at("hit_rate_no_sinks", start) - at("hit_rate_no_sinks", end)
    if drop < change:
        lines.append(f"**From kernel {start} to {end} the voted set stays predictive** (the sink-free hit rate moves "
                     f"by {-drop:+.2f}): it holds the positions the answer attends to, in wider clusters.")
    else:
        lines.append(f"**From kernel {start} to {end} the voted set buys contiguity with prediction**: the sink-free "
                     f"hit rate falls by {drop:.2f}, since a set of the same size spends its positions on the "
                     "neighbours of fewer voted tokens; what the wider kernel gains on the needle is whole values, "
                     "not a better guess of what the answer attends to.")
    return "\n".join(lines)


# -- across models (notebook 12) -----------------------------------------------------------------------------
def accuracy_by_kernel_by_model(table: pd.DataFrame) -> pd.DataFrame:
    """`accuracy_by_kernel` per model and experiment, at the main window (the one each model ran most kernels
    at) and the budget every model ran (the smallest shared one), with a `model` column in the table's order.

    table: notebook 10's rows (`10_cluster_width.csv`) of several models, stacked with a `model` column."""
    models = list(dict.fromkeys(table.model))
    compressed = table[table.method != "full"]
    budgets = set.intersection(*(set(compressed[compressed.model == m].budget.dropna().astype(int)) for m in models))
    if not budgets:
        raise ValueError("the models ran no budget in common: run notebook 10 at one shared budget on each")
    budget = min(budgets)
    frames = []
    for model in models:
        for experiment, part in table[table.model == model].groupby("experiment", sort=False):
            accuracy = accuracy_by_kernel(part, experiment)
            windows = accuracy.groupby("window_size").kernel_size.nunique()
            main = accuracy[(accuracy.window_size == windows.idxmax()) & (accuracy.budget == budget)]
            frames.append(main.assign(model=model))
    return pd.concat(frames, ignore_index=True)


def kernel_by_model_reading(accuracy: pd.DataFrame, enough: float = ENOUGH) -> str:
    """Notebook 12: per model (in size order), the paper's kernel against the widest one and the smallest kernel
    that is enough (>= `enough` x the full cache, on the prompts the full cache answers) for the needle and the
    suite; then whether that kernel is the same at every size. accuracy: `accuracy_by_kernel_by_model`."""
    models = list(dict.fromkeys(accuracy.model))
    budget = int(accuracy.budget.iloc[0])
    lines = [f"Accuracy against the pooling kernel at budget {budget} on {len(models)} model(s), on the prompts the "
             f"full cache answers where there are any (n = prompts):"]
    needed: dict[str, dict[str, int | None]] = {}
    for model in models:
        part = accuracy[accuracy.model == model]
        texts = []
        for experiment, group in part.groupby("experiment", sort=False):
            group = chosen_cells(group).sort_values("kernel_size")
            means = group.set_index("kernel_size")["mean"]
            target = enough * group.full_cache.iloc[0]
            reached = means[means >= target] if target > 0 else means.iloc[0:0]
            needed.setdefault(experiment, {})[model] = int(reached.index[0]) if len(reached) else None
            widest = int(means.index.max())
            text = (f"{experiment} kernel {PAPER_KERNEL} {means.get(PAPER_KERNEL, float('nan')):.2f}, kernel {widest} "
                    f"{means[widest]:.2f} (full cache {group.full_cache.iloc[0]:.2f}, n = {int(group.samples.max())})")
            texts.append(text + ("; enough from kernel " + str(needed[experiment][model]) if len(reached)
                                 else "; no kernel enough"))
        lines.append(f"- {model}: " + "; ".join(texts) + ".")
    for experiment, by_model in needed.items():
        if len(by_model) < 2:
            continue
        kernels = set(by_model.values())
        if len(kernels) == 1:
            kernel = kernels.pop()
            lines.append(f"**{experiment.capitalize()}: the same at every size:** " + (
                f"kernel {kernel} is the smallest that is enough on every model." if kernel is not None
                else "no kernel run is enough on any model."))
        else:
            lines.append(f"**{experiment.capitalize()}: differs between models:** the smallest kernel that is "
                         "enough is " + ", ".join(f"{m} {k if k is not None else 'none'}"
                                                  for m, k in by_model.items()) + ".")
    if len(models) < 2:
        lines.append(f"Only {', '.join(models)} has notebook 10's rows: nothing to compare across models.")
    return "\n".join(lines)
