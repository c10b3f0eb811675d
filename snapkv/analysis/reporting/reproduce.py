"""`snapkv reproduce`: every notebook and benchmark into one folder, and one page that links it all.

Parts, in order: each notebook of `notebook_dir` (papermill, see `snapkv.analysis.reporting.notebooks`) but
those of `AFTER_MODEL_PASSES`; then each `MODEL_PASSES` entry: some notebooks again with another `model_name`, into
`<out>/models/NAME/` (their own figures/ and pages; parts named `NAME/NOTEBOOK.ipynb`, "not run" when the model's
wheels are missing, left out when the caller chose one model); then the `AFTER_MODEL_PASSES` notebooks (they read
every pass's CSVs); then each benchmark script found in `benchmark_dir` (default: the `benchmarks/` folder next to
`notebook_dir`), run in a subprocess as `python SCRIPT --out <out>/benchmarks [--quick]` (`--quick` in every
profile but "full": the notebooks carry the default profile's findings) with its output in
`<out>/benchmarks/NAME.log`. A benchmark that needs CUDA is "not run" on a machine without it.

Resumable: a part that finished ("ok") with the same parameters and the same source (notebook or script
sha256), whose outputs are still there, is skipped unless `force=True`. A failing part is recorded with
its error and the next part runs; nothing already written is deleted. `<out>/notebooks.json` is the run
record (one entry per notebook and per benchmark). `<out>/index.html` is rebuilt from that record and
from the JSON files `save_result` writes to `<out>/figures` at the end of every run (interrupted or not).
"""

import datetime
import functools
import html
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from snapkv.analysis.reporting import notebooks as runner
from snapkv.analysis.reporting import runs
from snapkv.analysis.reporting.setup import PROFILES, check_profile
from snapkv.core import check_int
from snapkv.core.files import atomic_write_text

INDEX = "index.html"
FIGURES = "figures"
BENCHMARKS = "benchmarks"
NOT_RUN = 3  # a benchmark's exit code for "cannot run here" (its last log line says why)
MODEL_PARAMETERS = ("model_name", "device", "dtype")  # which model the notebooks load, where, in which precision
MODELS = runs.MODELS  # <out>/models/NAME/: a second model's pass


@dataclass(frozen=True)
class ModelPass:
    """Notebooks (by stem) run again with `model_name`, into `<out>/models/<model_name>/`, in the profiles of
    `profiles` (every profile by default), those of `full_only` in the full profile only (both: or with
    `all_models`); `parameters` {profile: {notebook stem: {name: value}}} sizes a larger model's runs below the
    profile's own counts (its figures say n)."""

    model_name: str
    notebooks: tuple[str, ...]
    profiles: tuple[str, ...] = PROFILES
    parameters: dict = field(default_factory=dict)
    full_only: tuple[str, ...] = ()

    def folder(self, out_dir) -> Path:
        return Path(out_dir) / MODELS / self.model_name

    def part(self, notebook: Path) -> str:
        return f"{self.model_name}/{notebook.name}"

    def notebook_parameters(self, profile: str, notebook: Path) -> dict:
        """The sizes of `notebook` in `profile`, sequences as lists (papermill writes a tuple as its text)."""
        sizes = self.parameters.get(profile, {}).get(notebook.stem, {})
        return {name: list(value) if isinstance(value, tuple) else value for name, value in sizes.items()}


ACROSS_MODELS = ("01_hit_rate_along_generation", "06_needle", "07_task_suite", "10_cluster_width")
LEADERBOARD = "14_query_agnostic"  # on SmolLM2 in every profile; on the other models in the full one
# notebook 10 on a second model in the default profile: the kernel that keeps whole values (5 against 31) at one budget
SECOND_MODEL_CLUSTER_WIDTH = dict(kernel_sizes=(5, 31), budgets=(128,), other_window_sizes=(), needle_lengths=(1000,),
                                  needle_depths=(0.1, 0.5, 0.9), needle_samples=1, tasks=("single_key",),
                                  task_lengths=(1000,), task_samples=1, task_kernel_sizes=(5, 31),
                                  hit_rate_samples=1)
# the Qwen models' counts in the default profile (the 0.5B runs 01 and 10 there, what fits the main job's half hour
# beside the small models: a 1,000-token prefill takes about 10 s on it, 4x SmolLM2's; --all-models runs every pass at
# these counts, the 1.5B's too, about 3x the 0.5B's time; the calibrated SnapKV (10 minutes on the 0.5B): --full only)
QWEN_DEFAULT = {
    "01_hit_rate_along_generation": dict(n_samples=2, n_sensitivity=1),
    "06_needle": dict(lengths=(1000,), depths=(0.1, 0.5, 0.9), methods=("full", "snapkv", "chunkkv"),
                      budgets=(128, 512), calibrated=False),
    "07_task_suite": dict(tasks=("single_key",), lengths=(1000,), samples=2, methods=("full", "snapkv"),
                          budgets=(128, 512), calibration_samples=2, calibrated=False),
    "10_cluster_width": SECOND_MODEL_CLUSTER_WIDTH,
}
# the one list of second models and the notebooks each runs: every cross-model figure on every embedded model
MODEL_PASSES = (
    ModelPass("gemma-3-270m", ("01_hit_rate_along_generation", "03_questions_same_document", *ACROSS_MODELS[1:],
                               LEADERBOARD), parameters={"default": {"10_cluster_width": SECOND_MODEL_CLUSTER_WIDTH}},
              full_only=("10_cluster_width", LEADERBOARD)),
    ModelPass("qwen2.5-coder-0.5b-instruct", (*ACROSS_MODELS, LEADERBOARD), profiles=("default", "full"),
              parameters={"default": QWEN_DEFAULT}, full_only=("06_needle", "07_task_suite", LEADERBOARD)),
    ModelPass("qwen2.5-coder-1.5b-instruct", (*ACROSS_MODELS, LEADERBOARD), profiles=("full",),
              parameters={"default": QWEN_DEFAULT}, full_only=(LEADERBOARD,)),
)
# notebooks that compare the passes: they run after them
AFTER_MODEL_PASSES = ("12_across_models",)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark script run as `python SCRIPT --out <out>/benchmarks [--quick]` (`--quick` unless the profile is
    "full"); `outputs` are the files it
    writes there on success (a JSON output with a "complete" key must say true)."""

    name: str
    script: Path
    outputs: tuple[str, ...]
    needs_cuda: bool = False

    def command(self, out_dir: Path, profile: str) -> list[str]:
        return [sys.executable, str(self.script), "--out", str(out_dir), *(["--quick"] if profile != "full" else [])]


def default_benchmarks(benchmark_dir) -> list[Benchmark]:
    """The project's benchmarks present in `benchmark_dir`: speed_memory.py (CPU), peers.py (beside kvpress, in
    an environment of its own) and gpu_scale.py (CUDA)."""
    folder = Path(benchmark_dir)
    known = [Benchmark("speed_memory", folder / "speed_memory.py", ("speed_memory.json", "speed_memory.png")),
             Benchmark("peers", folder / "peers.py", ("peers.json", "peers.png")),
             Benchmark("gpu_scale", folder / "gpu_scale.py", ("gpu_scale.json", "gpu_scale.png"), needs_cuda=True)]
    return [benchmark for benchmark in known if benchmark.script.is_file()]


def reproduce(out_dir="reports", *, notebook_dir="notebooks", profile: str = "default", model_name: str | None = None,
              device: str | None = None, dtype: str | None = None, parameters: dict | None = None,
              force: bool = False, benchmarks: list[Benchmark] | None = None, workers: int | None = None,
              kernel_name: str | None = None, execution_timeout: float | None = None,
              progress: bool = True, all_models: bool = False) -> pd.DataFrame:
    """Run every part (notebooks, then benchmarks) into `out_dir` and write `out_dir/index.html`.

    profile: "default" (every figure, sized for its finding: about 30 minutes on a 2-core CPU), "full" (paper
    scale, meant for a GPU) or "quick" (a smoke run); passed to every notebook (`setup.PROFILES`).
    model_name: passed as the `model_name` parameter to the notebooks that declare it (None: their default, and
    the `MODEL_PASSES` of the profile run too; a model given here means one model: no other model's pass).
    all_models: run every `MODEL_PASSES` entry whatever the profile (the Qwen 1.5B is in the full profile only).
    device, dtype: passed as the `device` / `dtype` parameters to the notebooks that declare them, e.g. "cuda"
    and "bfloat16" on a GPU (None: their default, CPU float32); checked before anything runs.
    parameters: extra papermill parameters for every notebook; notebooks that declare `interactive` get
    `interactive=False` (`notebooks.HEADLESS_PARAMETERS`). benchmarks: None for `default_benchmarks` of the
    `benchmarks/` folder next to `notebook_dir`; [] for none. workers: notebooks run side by side (None:
    `default_workers`; each runs its torch on one thread when there are several). execution_timeout: seconds one
    notebook cell may run before its notebook fails (None: no limit).
    Returns one row per part: part, kind, status ("ok", "failed", "skipped" = finished earlier, "not run"),
    seconds, output, error. Never raises for a failing part: check `status`.
    """
    check_device(device, dtype)
    check_profile(profile)
    workers = default_workers(device) if workers is None else check_int("workers", workers, 1)
    out_dir = Path(out_dir).resolve()  # absolute: every part and the page read it whatever their working folder
    notebooks = [notebook.resolve() for notebook in runner.find_notebooks(notebook_dir)]
    kernel_name = kernel_name or runner.DEFAULT_KERNEL
    runner.check_kernel(kernel_name)
    if benchmarks is None:
        benchmarks = default_benchmarks(Path(notebook_dir).resolve().parent / BENCHMARKS)
    parts = notebook_parts(out_dir, notebooks, profile=profile, model_name=model_name, device=device, dtype=dtype,
                           parameters=parameters, all_models=all_models)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for part in parts:
        if part.missing:
            rows.append(_not_run_notebook(out_dir, part.name, part.missing))
    todo = [part for part in parts if not part.missing and (force or not part.finished())]
    skipped = [part for part in parts if not part.missing and part not in todo]
    rows += [_skipped_part(part) for part in skipped]
    expected = expected_seconds(profile)
    if progress:
        print(plan_text(todo, benchmarks, expected, workers, profile), flush=True)
    try:
        with _threads_per_kernel(1 if workers > 1 else None):
            rows += run_parts(todo, workers, expected, kernel_name=kernel_name, execution_timeout=execution_timeout,
                              progress=progress)
        for benchmark in benchmarks:
            rows.append(_benchmark_part(benchmark, out_dir, profile, force))
    finally:
        write_index(out_dir)
    order = {part.name: index for index, part in enumerate(parts)}
    rows.sort(key=lambda row: order.get(row["part"], len(order)))
    return pd.DataFrame(rows, columns=["part", "kind", "status", "seconds", "output", "error"])


@dataclass(frozen=True)
class NotebookPart:
    """One notebook run of the main job: `notebook` into `folder` with `parameters`, recorded as `name` in the run
    record of `record_dir`; it starts once the parts named in `after` are done. `missing`: why it cannot run here
    (a second model's wheels are missing), or None."""

    name: str
    notebook: Path
    folder: Path
    record_dir: Path
    parameters: dict
    after: tuple[str, ...] = ()
    missing: str | None = None

    def finished(self) -> bool:
        return runner.finished(self.notebook, self.folder, self.parameters, record_dir=self.record_dir,
                               part=self.name)


def notebook_parts(out_dir, notebooks: list[Path], *, profile: str, model_name=None, device=None, dtype=None,
                   parameters=None, all_models: bool = False) -> list[NotebookPart]:
    """Every notebook run of the main job, in order: the notebooks on the default model, each `MODEL_PASSES`
    entry (unless `model_name` chose one model), then the `AFTER_MODEL_PASSES` notebooks, which wait for all the
    others. Within a model, a notebook of `WAITS_FOR` waits for the one it names (they share a cache)."""
    out_dir = Path(out_dir)
    optional = dict(runner.HEADLESS_PARAMETERS)
    optional |= {name: value for name, value in zip(MODEL_PARAMETERS, (model_name, device, dtype)) if value is not None}
    passes = [(None, out_dir, optional, notebooks, None)]
    if model_name is None:
        for model_pass in MODEL_PASSES:
            if profile not in model_pass.profiles and not all_models:
                continue
            chosen = [notebook for notebook in notebooks if notebook.stem in model_pass.notebooks and (
                profile == "full" or all_models or notebook.stem not in model_pass.full_only)]
            pass_optional = optional | {MODEL_PARAMETERS[0]: model_pass.model_name}
            passes.append((model_pass, model_pass.folder(out_dir), pass_optional, chosen,
                           _missing_model(model_pass.model_name)))
    parts, last = [], []
    for model_pass, folder, chosen_optional, chosen, missing in passes:
        common = runner.common_parameters(folder, profile=profile, parameters=parameters)
        for notebook in chosen:
            name = model_pass.part(notebook) if model_pass else notebook.name
            waits = WAITS_FOR.get(notebook.stem)
            after = ((model_pass.part(Path(waits + ".ipynb")) if model_pass else waits + ".ipynb"),) if waits else ()
            sized = dict(chosen_optional)
            if model_pass is not None:
                sizes = model_pass.notebook_parameters(profile, notebook)
                unknown = set(sizes) - set(runner.declared_parameters(notebook))
                if unknown:
                    raise ValueError(f"{model_pass.model_name}'s sizes for {notebook.name} name parameters it does "
                                     f"not declare: {', '.join(sorted(unknown))}")
                sized |= sizes
            part = NotebookPart(name, notebook, folder, out_dir, runner.notebook_parameters(notebook, common, sized),
                                after, missing)
            (last if model_pass is None and notebook.stem in AFTER_MODEL_PASSES else parts).append(part)
    every = tuple(part.name for part in parts)
    return parts + [NotebookPart(p.name, p.notebook, p.folder, p.record_dir, p.parameters, every) for p in last]


# a notebook that waits for another of the same model: 07 reuses the SnapKV calibration 06 computes (cached)
WAITS_FOR = {"07_task_suite": "06_needle"}


def default_workers(device: str | None = None) -> int:
    """Notebooks side by side: one per two CPU cores' worth of a 2-core machine, i.e. 2 workers of one torch thread
    each on a CPU of at least 2 cores (measured faster than one worker of 2 threads: `benchmarks/workers.py`);
    1 on a GPU, which one notebook keeps busy."""
    if device is not None and str(device).startswith("cuda"):
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_parts(parts: list[NotebookPart], workers: int, expected: dict, *, kernel_name: str,
              execution_timeout: float | None, progress: bool = True) -> list[dict]:
    """Run `parts`, `workers` at a time, longest expected first among those whose `after` parts are done, with one
    progress bar for the whole run and one per running part (expected seconds as their totals, so each shows an
    ETA). With several workers each notebook runs in a worker process (papermill changes the process's working
    directory while it runs a notebook, so two cannot share one process). Returns one row per part."""
    rows, done, running = [], set(), {}
    pending = sorted(parts, key=lambda part: -expected.get(part.name, UNKNOWN_SECONDS))
    names = {part.name for part in parts}
    total = sum(expected.get(part.name, UNKNOWN_SECONDS) for part in parts)
    bar = tqdm(total=round(total), desc=f"reproduce ({len(parts)} notebooks)", unit="s", disable=not progress,
               position=0, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} expected s [{elapsed}<{remaining}]")
    slots = list(range(1, workers + 1))

    def ready(part):
        return all(name in done or name not in names for name in part.after)

    def run(part, slot, run_notebook):
        guess = expected.get(part.name, UNKNOWN_SECONDS)
        with _ticking_bar(part.name, guess, slot, progress):
            row = run_notebook(part.notebook, part.folder, part.parameters, kernel_name,
                               execution_timeout=execution_timeout, record_dir=part.record_dir, part=part.name)
        return row, guess

    def finish(part, row, guess):
        done.add(part.name)
        bar.update(round(guess))
        rows.append(_notebook_row(row))
        if progress:
            tqdm.write(f"{row['status']:>6}  {part.name}  {row['seconds']:.0f} s (expected {guess:.0f} s)")

    if workers == 1:  # one at a time, in the parts' own order (which honours `after`), without worker processes
        for part in parts:
            row, guess = run(part, 1, runner.run_notebook)
            finish(part, row, guess)
        bar.close()
        return rows
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no thread or lock of this one is copied
    with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as processes, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            while pending and slots:
                part = next((p for p in pending if ready(p)), None)
                if part is None:
                    break
                pending.remove(part)
                slot = slots.pop(0)
                in_process = functools.partial(_submitted, processes)
                running[pool.submit(run, part, slot, in_process)] = (part, slot)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                part, slot = running.pop(future)
                slots.append(slot)
                finish(part, *future.result())
    bar.close()
    return rows


def _submitted(processes: ProcessPoolExecutor, *args, **kwargs) -> dict:
    """`runner.run_notebook(*args, **kwargs)` in one of `processes`, waited for."""
    return processes.submit(runner.run_notebook, *args, **kwargs).result()


UNKNOWN_SECONDS = 60.0  # a part with no measured time counts as one minute in the plan and the progress bar
EXPECTED_TIMES = Path(__file__).with_name("expected_seconds.json")


def expected_seconds(profile: str) -> dict:
    """Seconds each part took in a measured run of `profile` on a quiet 2-core CPU (`expected_seconds.json`,
    written from a run record by `record_expected_seconds`); empty when none was measured."""
    try:
        return json.loads(EXPECTED_TIMES.read_text(encoding="utf-8")).get(profile, {}).get("seconds", {})
    except (OSError, ValueError):
        return {}


def record_expected_seconds(out_dir, profile: str, note: str) -> dict:
    """Store the seconds of every part that finished "ok" in `out_dir`'s run record as `profile`'s expected times
    (with `note`: where and how they were measured)."""
    record = runner.read_run_record(out_dir)
    seconds = {name: entry["seconds"] for kind in ("notebooks", "benchmarks") for name, entry in record[kind].items()
               if entry.get("status") == "ok" and entry.get("seconds") is not None}
    try:
        stored = json.loads(EXPECTED_TIMES.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = {}
    stored[profile] = {"note": note, "seconds": dict(sorted(seconds.items()))}
    EXPECTED_TIMES.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return stored[profile]


def plan_text(parts: list[NotebookPart], benchmarks: list, expected: dict, workers: int, profile: str) -> str:
    """What a run will do, before it starts: each part with its expected minutes (measured on a 2-core CPU), and
    the expected wall time with `workers` side by side."""
    if not parts and not benchmarks:
        return f"snapkv reproduce ({profile} profile): every part has finished earlier (--force reruns them)"
    lines = [f"snapkv reproduce, {profile} profile: {len(parts)} notebook(s) on {workers} worker(s), "
             f"{len(benchmarks)} benchmark(s); expected minutes from a measured run on a 2-core CPU:"]
    for part in parts:
        seconds = expected.get(part.name)
        lines.append(f"  {part.name:<48} {'?' if seconds is None else f'{seconds / 60:5.1f}'}")
    for benchmark in benchmarks:
        seconds = expected.get(benchmark.name)
        lines.append(f"  {'benchmark ' + benchmark.name:<48} {'?' if seconds is None else f'{seconds / 60:5.1f}'}")
    notebook_seconds = sum(expected.get(part.name, UNKNOWN_SECONDS) for part in parts)
    benchmark_seconds = sum(expected.get(benchmark.name, UNKNOWN_SECONDS) for benchmark in benchmarks)
    lines.append(f"  about {(notebook_seconds / workers + benchmark_seconds) / 60:.0f} minutes in all "
                 f"('?': not measured, counted as {UNKNOWN_SECONDS / 60:.0f} min)")
    return "\n".join(lines)


@contextmanager
def _ticking_bar(name: str, expected: float, position: int, enabled: bool):
    """A progress bar for one running part: seconds elapsed against the expected seconds (its ETA), ticking once
    a second from a thread of its own."""
    bar = tqdm(total=max(1, round(expected)), desc=name[-40:], unit="s", position=position, leave=False,
               disable=not enabled, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{remaining} left]")
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            if bar.n < bar.total:
                bar.update(1)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()


@contextmanager
def _threads_per_kernel(threads: int | None):
    """Kernels started inside get `threads` torch/OpenMP threads (None: leave the environment as it is)."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    before = {name: os.environ.get(name) for name in names}
    if threads is not None:
        os.environ.update({name: str(threads) for name in names})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _skipped_part(part: NotebookPart) -> dict:
    return _notebook_row(runner.skipped_row(part.notebook, part.folder, record_dir=part.record_dir, part=part.name))


def _notebook_row(row: dict) -> dict:
    """reproduce's row of a notebook part, from the notebook runner's row."""
    return {"part": row["notebook"], "kind": "notebook", "status": row["status"], "seconds": row["seconds"],
            "output": row["html"] or row["executed"], "error": row["error"]}


def check_device(device: str | None, dtype: str | None) -> None:
    """ValueError/TypeError unless `device` is a torch device available here and `dtype` a floating dtype
    (the checks `snapkv.load_model` makes, made once before any notebook runs)."""
    from snapkv.core import loading

    if device is not None:
        loading.check_device(device)
    if dtype is not None:
        loading.check_dtype(dtype)


def _missing_model(model_name: str) -> str | None:
    """Why an embedded model cannot load here (its wheels are missing: the message names the pip command), or
    None when it can."""
    from snapkv.core import loading

    if model_name not in loading.EMBEDDED_MODELS:
        return None  # a folder or hub id: the notebook says what is wrong, if anything
    try:
        loading.embedded_model_files(model_name)
    except loading.MissingModelError as error:
        return str(error)
    return None


def _not_run_notebook(out_dir: Path, part: str, reason: str) -> dict:
    runner.update_run_record(out_dir, "notebooks", part, {"status": "not run", "seconds": None, "error": reason,
                                                          "executed": None, "html": None, "finished_at": _now()})
    return {"part": part, "kind": "notebook", "status": "not run", "seconds": None, "output": None, "error": reason}


# -- benchmarks ------------------------------------------------------------------------------------
def _benchmark_part(benchmark: Benchmark, out_dir: Path, profile: str, force: bool) -> dict:
    folder = out_dir / BENCHMARKS
    parameters = {"profile": profile, "out": str(folder.resolve()),
                  "script_sha256": runner.source_sha256(benchmark.script)}
    row = {"part": benchmark.name, "kind": "benchmark", "output": str(folder / benchmark.outputs[0])}
    if benchmark.needs_cuda and not _cuda_available():
        entry = {"status": "not run", "seconds": None, "error": "needs a CUDA device; none is available here",
                 "parameters": parameters, "outputs": []}
        runner.update_run_record(out_dir, "benchmarks", benchmark.name, entry | {"finished_at": _now()})
        return row | {"status": "not run", "seconds": None, "error": entry["error"]}
    if not force and benchmark_finished(benchmark, out_dir, parameters):
        entry = runner.read_run_record(out_dir)["benchmarks"][benchmark.name]
        return row | {"status": "skipped", "seconds": entry.get("seconds"), "error": None}
    entry = run_benchmark(benchmark, folder, profile) | {"parameters": parameters}
    runner.update_run_record(out_dir, "benchmarks", benchmark.name, entry | {"finished_at": _now()})
    return row | {"status": entry["status"], "seconds": entry["seconds"], "error": entry["error"]}


def run_benchmark(benchmark: Benchmark, folder: Path, profile: str) -> dict:
    """Run one benchmark script into `folder`; its stdout and stderr go to `folder/NAME.log`.

    Returns status ("ok"/"failed", or "not run" when the script exits with NOT_RUN: it could not run here, and
    its last log line says why), seconds, error (exit code and the log's last lines), command, log, outputs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{benchmark.name}.log"
    command = benchmark.command(folder.resolve(), profile)
    start = time.perf_counter()
    error = None
    try:
        with log.open("w", encoding="utf-8") as stream:
            done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, cwd=benchmark.script.parent.parent,
                                  check=False)
        if done.returncode == NOT_RUN:
            return {"status": "not run", "seconds": round(time.perf_counter() - start, 2),
                    "error": _log_tail(log, lines=1), "command": command, "log": str(log), "outputs": []}
        if done.returncode != 0:
            error = f"exit code {done.returncode}: {_log_tail(log)}"
    except OSError as failure:
        error = f"{type(failure).__name__}: {failure}"
    seconds = round(time.perf_counter() - start, 2)
    missing = [name for name in benchmark.outputs if not _output_complete(folder / name)]
    if missing and error is None:
        error = f"exit code 0 but {', '.join(missing)} missing or incomplete: {_log_tail(log)}"
    return {"status": "failed" if error else "ok", "seconds": seconds, "error": error, "command": command,
            "log": str(log), "outputs": [str(folder / name) for name in benchmark.outputs]}


def benchmark_finished(benchmark: Benchmark, out_dir, parameters: dict) -> bool:
    """The run record says the benchmark finished "ok" with these parameters, and its outputs are complete."""
    entry = runner.read_run_record(out_dir)["benchmarks"].get(benchmark.name)
    if not entry or entry.get("status") != "ok":
        return False
    if runner._normalized(entry.get("parameters")) != runner._normalized(parameters):
        return False
    return all(_output_complete(Path(out_dir) / BENCHMARKS / name) for name in benchmark.outputs)


def _output_complete(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return not isinstance(content, dict) or content.get("complete", True) is True
    return True


def _log_tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    # progress bars rewrite their line with carriage returns: keep what each line ended as
    kept = [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines()]
    return " | ".join([line for line in kept if line][-lines:]) or "(empty log)"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# -- the index page --------------------------------------------------------------------------------
def figure_records(out_dir, figures_dir=None) -> list[dict]:
    """Every `<out>/figures/*.json` written by `save_result` (name, settings, environment, rows), by name,
    with the files found next to it ("png", "html", "csv", "json": paths relative to out_dir).
    figures_dir: another folder of figures inside out_dir (e.g. `<out>/models/NAME/figures`)."""
    out_dir = Path(out_dir)
    folder = Path(figures_dir) if figures_dir is not None else out_dir / FIGURES
    prefix = folder.resolve().relative_to(out_dir.resolve()).as_posix()
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            record = {"error": f"unreadable: {error}"}
        if not isinstance(record, dict):
            record = {"error": "not a save_result record"}
        record.setdefault("name", path.stem)
        record["files"] = {kind: f"{prefix}/{path.stem}.{kind}" for kind in ("png", "html", "csv", "json")
                           if (path.parent / f"{path.stem}.{kind}").is_file()}
        records.append(record)
    return records


def write_index(out_dir) -> Path:
    """Write `<out>/index.html`: every part with its status and error, every figure (PNG inline; plotly HTML,
    CSV and settings JSON linked; settings shown), the benchmarks' outputs, and the environment."""
    out_dir = Path(out_dir)
    record = runner.read_run_record(out_dir)
    figures = figure_records(out_dir)
    notebook_entries = list(record["notebooks"].values())
    benchmark_entries = list(record["benchmarks"].values())
    by_prefix = {entry["notebook"].split("_", 1)[0]: entry["notebook"] for entry in notebook_entries}
    grouped: dict[str | None, list[dict]] = {}
    for figure in figures:
        grouped.setdefault(by_prefix.get(figure["name"].split("_", 1)[0]), []).append(figure)
    with_json = {figure["name"] for figure in figures}
    loose = [path for path in sorted((out_dir / FIGURES).glob("*.png")) if path.stem not in with_json]
    for path in loose:
        grouped.setdefault(by_prefix.get(path.stem.split("_", 1)[0]), []).append(
            {"name": path.stem, "files": {"png": f"{FIGURES}/{path.name}"}, "loose": True})

    failed = [e for e in notebook_entries + benchmark_entries if e.get("status") == "failed"]
    parts = [_part_row(e, "notebook", out_dir) for e in notebook_entries]
    parts += [_part_row(e, "benchmark", out_dir) for e in benchmark_entries]
    body = [f"<h1>snapkv reproduction</h1><p>{len(parts)} parts, "
            + (f"<b class='failed'>{len(failed)} failed</b>" if failed else "<b class='ok'>none failed</b>")
            + f"; {len(figures)} figures with settings. Page written {html.escape(_now())}.</p>",
            _findings_section(headline_findings(out_dir)),
            _screenshots_section(out_dir),
            _environment_section(record, figures, out_dir),
            "<h2>Parts</h2><table><tr><th>part</th><th>kind</th><th>status</th><th>seconds</th><th>finished</th>"
            "<th>outputs</th><th>error</th></tr>" + "".join(parts) + "</table>"]
    for entry in notebook_entries:
        name = entry["notebook"]
        body.append(f"<h2 id='{_anchor(name)}'>{html.escape(name)} {_status(entry.get('status'))}</h2>")
        if entry.get("error"):
            body.append(f"<pre class='error'>{html.escape(str(entry['error']))}</pre>")
        shown = grouped.get(name, [])
        if "/" in name:  # a second model's part: its figures are in <out>/models/MODEL/figures
            model, notebook = name.split("/", 1)
            shown = [figure for figure in figure_records(out_dir, out_dir / MODELS / model / FIGURES)
                     if figure["name"].split("_", 1)[0] == notebook.split("_", 1)[0]]
        body += [_figure_block(figure) for figure in shown] or ["<p>No figures.</p>"]
    if grouped.get(None):
        body.append("<h2>Other figures</h2>")
        body += [_figure_block(figure) for figure in grouped[None]]
    for entry in benchmark_entries:
        body.append(_benchmark_block(entry, out_dir))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>snapkv reproduction</title>"
            f"<style>{_STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    path = out_dir / INDEX
    atomic_write_text(path, page)
    return path


# -- headline findings -----------------------------------------------------------------------------
SCREENSHOTS = "screenshots"


@dataclass(frozen=True)
class Finding:
    """One headline number of a run, computed from a figure's CSV: `text` says what it is, `figure` names the
    figure (figures/NAME.*) it comes from; `value` is None when the run has no data for it (`text` says why)."""

    key: str
    text: str
    value: float | None
    figure: str


def headline_findings(out_dir) -> list[Finding]:
    """The run's headline numbers from `<out>/figures/*.csv`, each with its n and a 95% bootstrap interval over
    the prompts: SnapKV's hit rate with and without the attention sinks (01; also on every second model of the
    run, from `<out>/models/NAME/figures`), the overlap of two questions' voted sets (03), needle retention per
    method relative to the full cache (06), suite accuracy at the largest budget (07), needle accuracy of the
    paper's kernel against the widest (10), decode speed-up and memory at the longest prompt (08; one measurement
    each), the best question-agnostic method with 75% of the prompt removed (14; also on every other model). A
    finding whose CSV is missing or unreadable says so instead of a number."""
    figures = Path(out_dir) / FIGURES
    findings = []
    computations = [(compute, figures) for compute in (_hit_rate_findings, _overlap_findings, _needle_findings,
                                                       _suite_findings, _cluster_width_findings, _speed_findings,
                                                       _leaderboard_findings)]
    for folder in sorted((Path(out_dir) / MODELS).glob("*")):
        computations += [(compute, folder / FIGURES) for compute, name in (
            (_hit_rate_findings, "01_hit_rate_along_generation"), (_leaderboard_findings, "14_leaderboard"))
            if (folder / FIGURES / f"{name}.csv").is_file()]
    for compute, folder in computations:
        try:
            found = compute(folder)
        except Exception as error:  # noqa: BLE001 (one unreadable CSV must not cost the page)
            name = compute.__name__.removeprefix("_").removesuffix("_findings")
            found = [Finding(name, f"{name}: could not be computed ({type(error).__name__}: {error})", None, "")]
        if folder != figures:  # a second model's: say which, and keep keys apart
            found = [Finding(f"{folder.parent.name}_{f.key}", f"{folder.parent.name}: {f.text}", f.value,
                             f"{MODELS}/{folder.parent.name}/{FIGURES}/{f.figure}") for f in found]
        findings += found
    return findings


def _mean_finding(key: str, label: str, values: pd.DataFrame, column: str, unit: str, figure: str) -> Finding:
    """`label`: the mean of `column` over the rows of `values` (one per independent unit, e.g. a prompt), with a
    95% bootstrap interval and n."""
    from snapkv.analysis.observation.metrics import summarize

    summary = summarize(values.assign(all=0), ["all"], column).iloc[0]
    return Finding(key, f"{label}: {summary['mean']:.2f} {_interval(summary.ci_low, summary.ci_high)}, "
                        f"n = {int(summary.samples)} {unit}", float(summary["mean"]), figure)


def _overlap_findings(figures: Path) -> list[Finding]:
    name = "03_questions_same_document"
    table = _read_csv(figures, name)
    if table is None:
        return _not_written("overlap", "Question overlap", name)
    snap = table[table.reference == "snapkv"]
    per_document = snap.groupby("sample", as_index=False)[["overlap", "chance"]].mean()
    finding = _mean_finding("overlap", "Share of voted positions two questions on one document have in common "
                            "(all layers)", per_document, "overlap", "documents", name)
    return [Finding(finding.key, f"{finding.text}; chance {per_document.chance.mean():.2f}", finding.value, name)]


def _suite_findings(figures: Path) -> list[Finding]:
    name = "07_task_suite"
    table = _read_csv(figures, name)
    if table is None:
        return _not_written("suite", "Task suite", name)
    table = table[table["mode"] == "question-aware"]
    largest = table.budget.max()
    findings = []
    for method, rows in table[table.budget.isna() | (table.budget == largest)].groupby("method"):
        where = "full cache" if method == "full" else f"{method} at budget {int(largest)}"
        findings.append(_mean_finding(f"suite_{method}", f"Task-suite accuracy, {where} (question-aware, tasks the "
                                      "full cache solves)", rows, "score", "prompts", name))
    return sorted(findings, key=lambda f: -f.value)


def _cluster_width_findings(figures: Path) -> list[Finding]:
    name = "10_cluster_width"
    table = _read_csv(figures, name)
    if table is None:
        return _not_written("cluster_width", "Cluster width", name)
    needle = table[(table.task == "needle") & (table.method != "full")]
    main = needle[needle.window_size == needle.window_size.min()]
    budget = main.budget.min()
    kernels = sorted(main.kernel_size.dropna().astype(int).unique())
    chosen = [k for k in (5, kernels[-1]) if k in kernels]
    return [_mean_finding(f"cluster_width_k{kernel}", f"Needle accuracy of SnapKV with pooling kernel {kernel} at "
                          f"budget {int(budget)} (window {int(main.window_size.min())})",
                          main[(main.kernel_size == kernel) & (main.budget == budget)], "score", "prompts", name)
            for kernel in dict.fromkeys(chosen)]


def _leaderboard_findings(figures: Path) -> list[Finding]:
    """Per experiment: the question-agnostic method with the highest accuracy relative to the full cache when 75%
    of the prompt is removed (a pack keeping a quarter of the document), on the prompts the full cache answers."""
    from snapkv.analysis.quality import leaderboard

    name = "14_leaderboard"
    rows = _read_csv(figures, name)
    if rows is None:
        return _not_written("leaderboard", "Question-agnostic leaderboard", name)
    solved = leaderboard.answered(rows)
    agnostic = solved[solved["mode"] == "question-agnostic"]
    removed = 0.75 if (agnostic.removed == 0.75).any() else agnostic.removed.max()  # quick runs: their largest
    findings = []
    for experiment, group in agnostic[agnostic.removed == removed].groupby("experiment", sort=False):
        means = group.groupby("method").score.mean().sort_values(ascending=False, kind="stable")
        best = means.index[0]
        findings.append(_mean_finding(
            f"leaderboard_{experiment.replace(' ', '_')}", f"{experiment.capitalize()}, question-agnostic, "
            f"{removed * 100:g}% of the prompt removed: best {best}, accuracy relative to the full cache",
            group[group.method == best], "score", "prompts it answers", name))
    return findings


def _not_written(key: str, what: str, name: str) -> list[Finding]:
    """The finding `key` of a run whose notebook has not written figure `name`'s CSV."""
    return [Finding(key, f"{what}: notebook {name[:2]} has not written its CSV in this run.", None, name)]


def _read_csv(figures: Path, name: str) -> pd.DataFrame | None:
    path = figures / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def _hit_rate_findings(figures: Path) -> list[Finding]:
    from snapkv.analysis.observation.metrics import summarize

    name = "01_hit_rate_along_generation"
    table = _read_csv(figures, name)
    if table is None:
        return _not_written("hit_rate", "Hit rate", name)
    protocol = "reference" if "reference" in set(table.protocol) else sorted(set(table.protocol))[0]
    table = table[table.protocol == protocol]
    # one hit rate per prompt (all layers, heads and answer tokens pooled), then its mean over prompts with a 95%
    # bootstrap interval: the prompts are the independent samples
    sums = table.groupby(["reference", "sample"])[["hits", "important", "hits_no_sinks", "important_no_sinks"]].sum()
    per_prompt = pd.DataFrame({"with": sums.hits / sums.important,
                               "without": sums.hits_no_sinks / sums.important_no_sinks}).reset_index()
    findings = []
    for key, column, label in (("hit_rate", "with", "SnapKV hit rate"),
                               ("hit_rate_no_sinks", "without", "SnapKV hit rate without the attention sinks")):
        summary = summarize(per_prompt, ["reference"], column).set_index("reference")
        snap, means = summary.loc["snapkv"], summary["mean"].drop("snapkv", errors="ignore").dropna()
        best = f"; best reference set of the same size: {means.idxmax()} {means.max():.2f}" if len(means) else ""
        findings.append(Finding(key, f"{label} ({protocol} answers, all layers, heads and answer tokens pooled per "
                                     f"prompt): {snap['mean']:.2f} {_interval(snap.ci_low, snap.ci_high)}, "
                                     f"n = {int(snap.samples)} prompts{best}", float(snap["mean"]), name))
    return findings


def _interval(low: float, high: float) -> str:
    return f"[95% CI {low:.2f}-{high:.2f}]"


def _needle_findings(figures: Path) -> list[Finding]:
    from snapkv.analysis.quality.statistics import retention_table

    name = "06_needle"
    table = _read_csv(figures, name)
    if table is None:
        return _not_written("needle", "Needle retention", name)
    table = table[table.task == "needle"]
    mode = "question-aware" if "question-aware" in set(table["mode"]) else sorted(set(table["mode"]))[0]
    table = table[table["mode"] == mode]
    retention = retention_table(table, by=("method",), resamples=1000)
    budgets = sorted(table.budget.dropna().astype(int).unique())
    span = f"budgets {budgets[0]}-{budgets[-1]}" if len(budgets) > 1 else f"budget {budgets[0]}" if budgets else ""
    findings = []
    for row in sorted(retention.itertuples(), key=lambda r: -r.retention if pd.notna(r.retention) else 1):
        findings.append(Finding(f"needle_{row.method}", f"Needle retention, {row.method} ({mode}, {span}): "
                                f"{row.retention:.0%} of the full cache's score {_interval(row.ci_low, row.ci_high)}"
                                f" ({row.score:.2f} vs {row.full_score:.2f}), n = {row.prompts} (prompt, budget) pairs",
                                float(row.retention), name))
    return findings


def _speed_findings(figures: Path) -> list[Finding]:
    name = "08_speed_memory"
    table = _read_csv(figures, name)
    if table is None:
        return _not_written("speed", "Decode speed and memory", name)
    ok = table[table.status == "ok"]
    batch = ok.batch_size.min()
    ok = ok[ok.batch_size == batch]
    full = ok[ok.method == "FullCache"]
    longest = int(full.prompt_len.max())
    full = full[full.prompt_len == longest].iloc[0]
    snap = ok[(ok.method == "SnapKV") & (ok.prompt_len == longest)].sort_values("budget")
    if snap.empty:
        return [Finding("speed", f"Decode speed: no SnapKV measurement at {longest} tokens.", None, name)]
    snap = snap.iloc[0]
    speedup = full.decode_ms_per_token / snap.decode_ms_per_token
    where = f"at the longest prompt, {longest} tokens, batch {batch}, SnapKV budget {int(snap.budget)}"
    return [Finding("decode_speedup", f"Decode speed-up {where}: {speedup:.2f}x ({full.decode_ms_per_token:.1f} vs "
                                      f"{snap.decode_ms_per_token:.1f} ms/token)", float(speedup), name),
            Finding("memory", f"Memory (weights + KV cache) {where}: {snap.memory_mib:.0f} MiB vs "
                              f"{full.memory_mib:.0f} MiB with the full cache; KV cache {snap.kv_cache_mib:.1f} vs "
                              f"{full.kv_cache_mib:.1f} MiB", float(snap.memory_mib), name)]


def _findings_section(findings: list[Finding]) -> str:
    items = []
    for finding in findings:
        link = ""
        if "/" in finding.figure:  # a second model's figure: its own folder
            link = f" (<a href='{html.escape(finding.figure)}.html'>interactive</a>)"
        elif finding.figure:
            link = (f" (<a href='#figure-{_anchor(finding.figure)}'>figure</a>, "
                    f"<a href='{FIGURES}/{html.escape(finding.figure)}.html'>interactive</a>)")
        css = "" if finding.value is not None else " class='missing'"
        items.append(f"<li id='finding-{_anchor(finding.key)}'{css}>{html.escape(finding.text)}{link}</li>")
    return ("<h2 id='findings'>Headline findings of this run</h2><p>Computed from the figures' CSVs.</p><ul>"
            + "".join(items) + "</ul>")


def _screenshots_section(out_dir: Path) -> str:
    shots = sorted((Path(out_dir) / SCREENSHOTS).glob("*.png"))
    if not shots:
        return ""
    links = " &middot; ".join(f"<a href='{SCREENSHOTS}/{html.escape(p.name)}'>{html.escape(p.stem)}</a>" for p in shots)
    return (f"<p>Screenshots taken by the browser test (headless Chromium, network blocked): {links}</p>")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px;
text-align: left; vertical-align: top; font-size: 0.9em; } .ok { color: #1a7f37; } .failed { color: #cf222e; }
.skipped, .notrun { color: #9a6700; } pre.error { background: #fff0f0; border-left: 4px solid #cf222e; padding: 0.5em;
white-space: pre-wrap; } img { max-width: 100%; border: 1px solid #eee; } .figure { margin: 1.5em 0 2.5em; }
details { margin: 0.3em 0; } code { font-size: 0.9em; } li.missing { color: #9a6700; }
"""


def _status(status) -> str:
    css = {"ok": "ok", "failed": "failed", "not run": "notrun"}.get(status, "skipped")
    return f"<span class='{css}'>{html.escape(str(status))}</span>"


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def _link(path, out_dir: Path, label: str) -> str:
    if not path:
        return ""
    path = Path(path)
    try:
        relative = path.resolve().relative_to(out_dir.resolve())
    except ValueError:
        relative = path
    if not (out_dir / relative).exists() and not path.exists():
        return ""
    return f"<a href='{html.escape(relative.as_posix())}'>{html.escape(label)}</a>"


def _part_row(entry: dict, kind: str, out_dir: Path) -> str:
    name = entry.get(kind, "?")
    if kind == "notebook":
        outputs = [_link(entry.get("html"), out_dir, "HTML"), _link(entry.get("executed"), out_dir, "ipynb")]
        title = f"<a href='#{_anchor(name)}'>{html.escape(name)}</a>"
    else:
        outputs = [_link(entry.get("log"), out_dir, "log")]
        outputs += [_link(path, out_dir, Path(path).name) for path in entry.get("outputs", [])]
        title = f"<a href='#benchmark-{_anchor(name)}'>{html.escape(name)}</a>"
    seconds = entry.get("seconds")
    error = entry.get("error")
    seconds = "" if seconds is None else f"{seconds:.0f}"
    finished = html.escape(str(entry.get("finished_at", "")))
    error = "" if not error else f"<pre class='error'>{html.escape(str(error))}</pre>"
    return (f"<tr><td>{title}</td><td>{kind}</td><td>{_status(entry.get('status'))}</td><td>{seconds}</td>"
            f"<td>{finished}</td><td>{' '.join(o for o in outputs if o)}</td><td>{error}</td></tr>")


def _settings_table(settings) -> str:
    if not isinstance(settings, dict) or not settings:
        return ""
    rows = "".join(f"<tr><td><code>{html.escape(str(k))}</code></td><td><code>{html.escape(json.dumps(v, default=str))}"
                   f"</code></td></tr>" for k, v in settings.items())
    return f"<table>{rows}</table>"


def _figure_block(figure: dict) -> str:
    files = figure.get("files", {})
    name = html.escape(figure["name"])
    parts = [f"<div class='figure'><h3 id='figure-{_anchor(figure['name'])}'>{name}</h3>"]
    if "png" in files:
        parts.append(f"<a href='{html.escape(files['png'])}'><img src='{html.escape(files['png'])}' alt='{name}'></a>")
    links = [f"<a href='{html.escape(files[kind])}'>{label}</a>" for kind, label in
             (("html", "interactive (plotly)"), ("csv", "data (CSV)"), ("json", "settings (JSON)")) if kind in files]
    if links:
        parts.append("<p>" + " &middot; ".join(links) + "</p>")
    if figure.get("loose"):
        parts.append("<p><i>No settings JSON next to this PNG (the notebook did not save it with save_result).</i></p>")
    if figure.get("error"):
        parts.append(f"<pre class='error'>{html.escape(figure['error'])}</pre>")
    environment = figure.get("environment") or {}
    if environment:
        summary = ", ".join(f"{k}: {environment[k]}" for k in ("model_id", "dtype", "device", "torch_version",
                                                                "transformers_version", "date") if environment.get(k))
        parts.append(f"<p><small>{html.escape(summary)}; {figure.get('rows', '?')} data rows</small></p>")
    if figure.get("settings"):
        parts.append(f"<details><summary>settings</summary>{_settings_table(figure['settings'])}</details>")
    parts.append("</div>")
    return "".join(parts)


def _benchmark_block(entry: dict, out_dir: Path) -> str:
    name = entry["benchmark"]
    parts = [f"<h2 id='benchmark-{_anchor(name)}'>benchmark: {html.escape(name)} {_status(entry.get('status'))}</h2>"]
    if entry.get("error"):
        parts.append(f"<pre class='error'>{html.escape(str(entry['error']))}</pre>")
    if entry.get("command"):
        parts.append(f"<p><code>{html.escape(' '.join(map(str, entry['command'])))}</code></p>")
    for path in entry.get("outputs", []):
        path = Path(path)
        link = _link(path, out_dir, path.name)
        if not link:
            continue
        if path.suffix == ".png":
            relative = html.escape(_relative(path, out_dir))
            parts.append(f"<a href='{relative}'><img src='{relative}' alt='{html.escape(name)}'></a>")
        elif path.suffix == ".json":
            parts.append(f"<p>{link}</p>")
            try:
                content = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(content, dict):
                parts.append(f"<details><summary>settings</summary>{_settings_table(content.get('settings'))}</details>")
                parts.append(f"<details><summary>environment</summary>"
                             f"{_settings_table(content.get('environment'))}</details>")
    parts.append(f"<p>{_link(entry.get('log'), out_dir, 'log')}</p>")
    return "".join(parts)


def _relative(path: Path, out_dir: Path) -> str:
    try:
        return path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _environment_section(record: dict, figures: list[dict], out_dir: Path) -> str:
    models = sorted({str(f["environment"]["model_id"]) for f in figures
                     if isinstance(f.get("environment"), dict) and f["environment"].get("model_id")})
    requested = sorted({str(e.get("parameters", {}).get(MODEL_PARAMETERS[0])) for e in record["notebooks"].values()
                        if e.get("parameters", {}).get(MODEL_PARAMETERS[0]) is not None})
    machine = record.get("machine") or runner.machine_description()
    versions = record.get("versions") or {}
    parameters = record.get("parameters") or {}
    rows = {
        "models (from figure settings)": ", ".join(models) or "none recorded",
        "model_name passed to notebooks": ", ".join(requested) or "none (each notebook's default)",
        "profile": parameters.get("profile"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        "python": record.get("python"),
        "platform": record.get("platform"),
        "CPU": f"{machine.get('cpu')} ({machine.get('cpu_count')} logical CPUs)",
        "memory": f"{machine.get('memory_gib')} GiB",
        "GPU": machine.get("gpu") or "none",
        "last part finished": record.get("updated"),
        "run record": _link(out_dir / runner.RUN_RECORD, out_dir, runner.RUN_RECORD) or "none",
    }
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{v if k == 'run record' else html.escape(str(v))}</td></tr>"
                    for k, v in rows.items())
    return f"<h2>Environment</h2><table>{cells}</table>"
