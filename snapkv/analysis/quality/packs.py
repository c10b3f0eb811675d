"""KV packs (notebook 11, `snapkv pack` / `snapkv ask`): what compressing a document once and asking it many
questions saves, and what not knowing the question costs.

  prompts    `document_ids` (chat head + document) and `question_ids` (the question closing the user turn): the
             prompt format of the quality prompts (`snapkv.analysis.text.chat_parts`), cut at the question
  speed      `pack_timings`: time to first token with a pack against recomputing context + question, the time
             to make and load a pack, and its size in memory and on disk, per context length
  quality    `question_cost`: needle and task-suite answers with compression that saw the question
             (question-aware) and without it (question-agnostic); the runner's question-agnostic mode answers as
             a pack does (pinned by tests/analysis/quality/test_packs.py), so it is reused here
Readings and the speed figure are computed from those tables; the quality figure is
`quality.plots.accuracy_vs_budget_figure` (solid: question-aware, dashed: question-agnostic).
"""

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import matplotlib.pyplot as plt
import pandas as pd
import plotly.graph_objects as go
import seaborn as sns
import torch
from plotly.subplots import make_subplots

import snapkv
from snapkv.analysis.quality.methods import KERNEL_SIZE, MODES, WINDOW_SIZE, check_lengths_fit, method_grid
from snapkv.analysis.quality.prompts import needle_prompts, task_prompts
from snapkv.analysis.quality.runner import DEFAULT_PREFILL_CHUNK, calibrated_evaluate, evaluate
from snapkv.analysis.speed.measure import warm_up
from snapkv.analysis.text import answer_start, chat_parts, question_text, stdlib_source_ids, token_ids
from snapkv.core.policies import check_int

MIB = 2**20
TIMING_QUESTIONS = ("What does this code do?", "Which function is defined first?", "What does the module import?",
                    "Name one class defined here.", "What is the last function about?")
RECOMPUTE, FULL_PACK = "recompute", "full pack"


@dataclass(frozen=True)
class PackSettings:
    """Notebook 11's settings (paper scale); DEFAULT and QUICK: what the default and quick profiles change."""

    lengths: tuple[int, ...] = (1000, 2000, 4000, 8000)  # context tokens of the timing runs
    budget: int = 512  # the compressed pack of the timing runs (SnapKV)
    repeats: int = 3  # questions timed per length and method (their median is reported)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # packs are made in chunks of this many tokens
    quality_lengths: tuple[int, ...] = (1000, 2000, 4000)  # prompt tokens of the needle and suite prompts
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    tasks: tuple[str, ...] = ("single_key", "multi_key")
    samples: int = 3  # suite prompts per task and length
    methods: tuple[str, ...] = ("full", "snapkv", "streaming")
    budgets: tuple[int, ...] = (128, 256, 512, 1024)
    window_size: int = WINDOW_SIZE
    kernel_size: int = KERNEL_SIZE
    seed: int = 0
    DEFAULT: ClassVar[dict] = dict(lengths=(1000, 4000), repeats=2, quality_lengths=(1000,),
                                   depths=(0.0, 0.5, 1.0), samples=2, budgets=(128, 512))
    QUICK: ClassVar[dict] = dict(lengths=(512,), budget=128, repeats=1, quality_lengths=(512,), depths=(0.5,),
                                 tasks=("single_key",), samples=1, methods=("full", "snapkv"), budgets=(128,))

    def __post_init__(self):
        for name in ("lengths", "quality_lengths"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: give at least one context length")
            for length in getattr(self, name):
                check_int(name, length, 1)
        check_int("repeats", self.repeats, 1)
        check_int("samples", self.samples, 1)
        check_int("prefill_chunk", self.prefill_chunk, self.window_size)
        if check_int("budget", self.budget, 1) <= self.window_size:
            raise ValueError(f"budget ({self.budget}) must exceed window_size ({self.window_size})")
        if min(self.lengths) <= self.budget:
            raise ValueError(f"every timing length must exceed the budget ({self.budget}), got {list(self.lengths)}: "
                             "a pack of a shorter context is not compressed")

    @property
    def policy(self) -> snapkv.SnapKV:
        """The compressed pack of the timing runs."""
        return snapkv.SnapKV(window_size=self.window_size, max_capacity_prompt=self.budget,
                             kernel_size=self.kernel_size)


# -- prompts ------------------------------------------------------------------------------------------------
def document_ids(tokenizer, text: str) -> torch.Tensor:
    """(1, n) ids of a one-turn prompt's start: the chat head, then the document (`chat_parts`)."""
    head, _ = chat_parts(tokenizer)
    return torch.tensor([head + token_ids(tokenizer, text)])


def question_ids(tokenizer, question: str, answer_prefix: str = "") -> torch.Tensor:
    """(1, q) ids that close a `document_ids` prompt: a blank line, the question, the end of the user turn and the
    assistant header (the plain "Question: ...\\nAnswer:" format without a chat template), as the quality prompts'
    tail."""
    _, end = chat_parts(tokenizer)
    return torch.tensor([token_ids(tokenizer, f"\n\n{question_text(tokenizer, question)}"
                                              f"{answer_start(tokenizer, end, answer_prefix)}")])


def source_document_ids(tokenizer, length: int) -> torch.Tensor:
    """(1, length) ids: the chat head and standard-library source (`stdlib_source_ids`)."""
    head, _ = chat_parts(tokenizer)
    return torch.tensor([head + stdlib_source_ids(tokenizer, length - len(head))])


# -- speed and size ---------------------------------------------------------------------------------------------
def timed(function, *args, **kwargs) -> tuple[float, object]:
    """(wall seconds, result) of `function(*args, **kwargs)`."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def folder_bytes(path) -> int:
    return sum(file.stat().st_size for file in Path(path).iterdir() if file.is_file())


def pack_timings(model, tokenizer, settings: PackSettings = PackSettings(), *, progress: bool = True) -> pd.DataFrame:
    """Time to first token with a pack against recomputing, per context length.

    For each length: a context of standard-library source and `settings.repeats` questions; `recompute` runs
    `model.generate(context + question, max_new_tokens=1)`; the full pack and a SnapKV pack at `settings.budget`
    are made once (`pack_s`), saved and loaded again (`load_s`, the weights fingerprint included), asked one
    untimed question (warm-up), then each question (`pack.generate(question, max_new_tokens=1)`). One row per
    (length, method, question): length, method, budget, question, ttft_s, pack_s, load_s, memory_mib (the pack's
    tensors), disk_mib (its folder).
    """
    from tqdm.auto import tqdm

    check_lengths_fit(settings.lengths, model, 24)
    warm_up(model, source_document_ids(tokenizer, 64))  # thread pools and kernels, before any timing
    questions = [question_ids(tokenizer, q) for q in (TIMING_QUESTIONS * settings.repeats)[: settings.repeats]]
    rows = []
    generate = dict(max_new_tokens=1, do_sample=False)
    for length in tqdm(settings.lengths, desc="pack timings", unit="length", disable=not progress):
        context = source_document_ids(tokenizer, length)
        for index, question in enumerate(questions):
            seconds, _ = timed(model.generate, torch.cat([context, question], 1), **generate)
            rows.append(dict(length=length, method=RECOMPUTE, budget=None, question=index, ttft_s=seconds))
        for name, policy in ((FULL_PACK, None), (f"snapkv-{settings.budget} pack", settings.policy)):
            pack_s, packed = timed(snapkv.pack, model, context, policy, tokenizer=tokenizer,
                                   prefill_chunk_size=settings.prefill_chunk)
            with tempfile.TemporaryDirectory() as folder:
                path = packed.save(Path(folder) / "pack")
                disk = folder_bytes(path)
                load_s, packed = timed(snapkv.KVPack.load, path, model, tokenizer)
            packed.generate(questions[0], **generate)  # untimed: the first call through a path warms it up
            for index, question in enumerate(questions):
                seconds, _ = timed(packed.generate, question, **generate)
                rows.append(dict(length=length, method=name, budget=None if policy is None else settings.budget,
                                 question=index, ttft_s=seconds, pack_s=pack_s, load_s=load_s,
                                 memory_mib=packed.nbytes / MIB, disk_mib=disk / MIB))
    table = pd.DataFrame.from_records(rows)
    table["budget"] = table["budget"].astype("Int64")
    return table


def pack_summary(timings: pd.DataFrame) -> pd.DataFrame:
    """One row per (length, method): median ttft_s over the questions, pack_s, load_s, memory_mib, disk_mib, and
    speedup (the recomputing median over this one's)."""
    summary = (timings.groupby(["length", "method"], sort=False, dropna=False)
               .agg(ttft_s=("ttft_s", "median"), questions=("ttft_s", "size"), pack_s=("pack_s", "first"),
                    load_s=("load_s", "first"), memory_mib=("memory_mib", "first"), disk_mib=("disk_mib", "first"))
               .reset_index())
    recompute = summary[summary.method == RECOMPUTE].set_index("length").ttft_s
    return summary.assign(speedup=summary.length.map(recompute) / summary.ttft_s)


def pack_speed_figure(timings: pd.DataFrame, caption: str):
    """Left: time to first token against context length (median over the questions; recomputing, full pack,
    compressed pack). Right: the packs' size in memory (solid) and on disk (dashed) against context length."""
    summary = pack_summary(timings)
    methods = list(dict.fromkeys(summary.method))
    colors = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    sns.set_theme(style="whitegrid")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    interactive = make_subplots(rows=1, cols=2, subplot_titles=("time to first token", "pack size"))
    for method in methods:
        part = summary[summary.method == method].sort_values("length")
        color = colors[method]
        hex_color = "#" + "".join(f"{round(c * 255):02x}" for c in color)
        left.plot(part.length, part.ttft_s, marker="o", color=color, label=method)
        interactive.add_trace(go.Scatter(x=part.length, y=part.ttft_s, mode="lines+markers", name=method,
                                         legendgroup=method, line={"color": hex_color}), row=1, col=1)
        if method == RECOMPUTE:
            continue
        for column, dash, plotly_dash, where in (("memory_mib", "-", "solid", "memory"),
                                                 ("disk_mib", "--", "dash", "disk")):
            right.plot(part.length, part[column], marker="o", color=color, linestyle=dash, label=f"{method}, {where}")
            interactive.add_trace(go.Scatter(x=part.length, y=part[column], mode="lines+markers",
                                             name=f"{method}, {where}", legendgroup=method,
                                             line={"color": hex_color, "dash": plotly_dash}), row=1, col=2)
    left.set(xlabel="context length (tokens)", ylabel="seconds to the first answer token", yscale="log",
             title="time to first token")
    right.set(xlabel="context length (tokens)", ylabel="MiB", yscale="log", title="pack size")
    lengths = sorted(summary.length.unique())
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(length) for length in lengths])
        ax.minorticks_off()
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.suptitle(f"Compress once, ask many ({caption})", fontsize=11)
    fig.tight_layout()
    interactive.update_xaxes(title_text="context length (tokens)", type="log")
    interactive.update_yaxes(type="log")
    interactive.update_yaxes(title_text="seconds to the first answer token", row=1, col=1)
    interactive.update_yaxes(title_text="MiB", row=1, col=2)
    interactive.update_layout(title=f"Compress once, ask many ({caption})", height=450)
    return fig, interactive


def pack_speed_reading(timings: pd.DataFrame) -> str:
    """What the timings say at the longest context: time to first token of each pack against recomputing, the
    one-off cost of making a pack, and its size."""
    summary = pack_summary(timings)
    longest = summary[summary.length == summary.length.max()].set_index("method")
    recompute = longest.loc[RECOMPUTE]
    lines = [f"At {int(summary.length.max())} context tokens, recomputing context + question takes "
             f"{recompute.ttft_s:.2f} s to the first answer token."]
    full = longest.loc[FULL_PACK] if FULL_PACK in longest.index else None
    for method, row in longest.drop(RECOMPUTE).iterrows():
        size = ""
        if full is not None and method != FULL_PACK:
            size = (f", {full.disk_mib / row.disk_mib:.1f}x smaller on disk than the full pack "
                    f"({full.disk_mib:.1f} MiB) and {full.memory_mib / row.memory_mib:.1f}x in memory")
        lines.append(f"- {method}: {row.ttft_s:.3f} s ({row.speedup:.1f}x faster); made once in {row.pack_s:.2f} s, "
                     f"loaded from disk in {row.load_s:.2f} s; {row.memory_mib:.1f} MiB in memory, "
                     f"{row.disk_mib:.1f} MiB on disk{size}.")
    return "\n".join(lines)


# -- quality ------------------------------------------------------------------------------------------------
def question_cost(model, tokenizer, settings: PackSettings = PackSettings(), *, haystack_text: str | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Needle and task-suite answers of every method in both modes (`MODES`): compressing with the question in
    the observation window (question-aware) and before it, as a pack does (question-agnostic). The suite keeps the
    (task, length) groups the full cache solves (`calibrated_evaluate`). One row per (prompt, mode, method,
    budget), as `quality.evaluate`."""
    grid = method_grid(settings.methods, settings.budgets, (), window_size=settings.window_size,
                       kernel_size=settings.kernel_size, tokenizer=tokenizer)
    needles = needle_prompts(tokenizer, lengths=settings.quality_lengths, depths=settings.depths, samples=1,
                             seed=settings.seed, haystack_text=haystack_text)
    suite = task_prompts(tokenizer, tasks=settings.tasks, lengths=settings.quality_lengths, samples=settings.samples,
                         seed=settings.seed, haystack_text=haystack_text)
    needle_table = evaluate(model, tokenizer, needles, grid, modes=MODES, progress=progress)
    suite_table, _ = calibrated_evaluate(model, tokenizer, suite, grid, modes=MODES,
                                         calibration_samples=min(settings.samples, 3), progress=progress)
    return pd.concat([needle_table, suite_table], ignore_index=True)


def question_cost_reading(table: pd.DataFrame) -> str:
    """Per compressing method and budget: the mean score over every prompt with and without the question in view,
    and what not knowing it costs; the full cache's score for scale."""
    frame = table.assign(budget=table.budget.astype("float").fillna(-1).astype(int))
    means = frame.groupby(["method", "budget", "mode"]).score.mean().unstack("mode")
    prompts = frame.groupby(["task", "length", "depth", "sample"], dropna=False).ngroups
    tasks = ", ".join(sorted(frame.task.unique()))
    lines = [f"Mean score over {prompts} prompts ({tasks}), question-aware against question-agnostic (a pack "
             "compresses before it sees the question):"]
    for (method, budget), row in means.iterrows():
        name = "full cache" if budget < 0 else f"{method} @ {budget}"
        aware, agnostic = row["question-aware"], row["question-agnostic"]
        lines.append(f"- {name}: {aware:.2f} with the question in view, {agnostic:.2f} without "
                     f"({aware - agnostic:+.2f})")
    compressing = means[[budget >= 0 for _, budget in means.index]]
    if len(compressing):
        cost = compressing["question-aware"] - compressing["question-agnostic"]
        worst = cost.idxmax()
        if cost.max() > 0:
            lines.append(f"Not knowing the question costs up to {cost.max():.2f} ({worst[0]} @ {worst[1]}) and "
                         f"{cost.mean():+.2f} on average over the compressing methods and budgets.")
        else:
            lines.append("Not knowing the question cost nothing here: question-agnostic compression scored at least "
                         f"as well as question-aware compression for every compressing method and budget "
                         f"({cost.mean():+.2f} on average).")
    return "\n".join(lines)
