"""`snapkv reproduce`: every notebook and benchmark into one folder, and one page that links it all.

Parts, in order: each notebook of `notebook_dir` (papermill, see `snapkv.analysis.reporting.notebooks`) but
those of `AFTER_MODEL_PASSES`; then each `MODEL_PASSES` entry: some notebooks again with another `model_name`, into
`<out>/models/NAME/` (their own figures/ and pages; parts named `NAME/NOTEBOOK.ipynb`, "not run" when the model's
wheels are missing, left out when the caller chose one model); then the `AFTER_MODEL_PASSES` notebooks (they read
every pass's CSVs); then each benchmark script found in `benchmark_dir` (default: the `benchmarks/` folder next to
`notebook_dir`), run in a subprocess as `python SCRIPT --out <out>/benchmarks [--quick]` with its output in
`<out>/benchmarks/NAME.log`. A benchmark that needs CUDA is "not run" on a machine without it.

Resumable: a part that finished ("ok") with the same parameters and the same source (notebook or script
sha256), whose outputs are still there, is skipped unless `force=True`. A failing part is recorded with
its error and the next part runs; nothing already written is deleted. `<out>/notebooks.json` is the run
record (one entry per notebook and per benchmark). `<out>/index.html` is rebuilt from that record and
from the JSON files `save_result` writes to `<out>/figures` at the end of every run (interrupted or not).
"""

import datetime
import html
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from snapkv.analysis.reporting import notebooks as runner
from snapkv.analysis.reporting import runs

INDEX = "index.html"
FIGURES = "figures"
BENCHMARKS = "benchmarks"
NOT_RUN = 3  # a benchmark's exit code for "cannot run here" (its last log line says why)
MODEL_PARAMETERS = ("model_name", "device", "dtype")  # which model the notebooks load, where, in which precision
MODELS = runs.MODELS  # <out>/models/NAME/: a second model's pass


@dataclass(frozen=True)
class ModelPass:
    """Notebooks (by stem) run a second time with `model_name`, into `<out>/models/<model_name>/`."""

    model_name: str
    notebooks: tuple[str, ...]

    def folder(self, out_dir) -> Path:
        return Path(out_dir) / MODELS / self.model_name

    def part(self, notebook: Path) -> str:
        return f"{self.model_name}/{notebook.name}"


# the one list of second models and the notebooks each runs (issue #16: every headline figure on both models)
MODEL_PASSES = (ModelPass("gemma-3-270m", ("01_hit_rate_along_generation", "03_questions_same_document",
                                           "06_needle", "07_task_suite")),)
# notebooks that compare the passes: they run after them
AFTER_MODEL_PASSES = ("12_across_models",)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark script run as `python SCRIPT --out <out>/benchmarks [--quick]`; `outputs` are the files it
    writes there on success (a JSON output with a "complete" key must say true)."""

    name: str
    script: Path
    outputs: tuple[str, ...]
    needs_cuda: bool = False

    def command(self, out_dir: Path, quick: bool) -> list[str]:
        return [sys.executable, str(self.script), "--out", str(out_dir), *(["--quick"] if quick else [])]


def default_benchmarks(benchmark_dir) -> list[Benchmark]:
    """The project's benchmarks present in `benchmark_dir`: speed_memory.py (CPU), peers.py (beside kvpress, in
    an environment of its own) and gpu_scale.py (CUDA)."""
    folder = Path(benchmark_dir)
    known = [Benchmark("speed_memory", folder / "speed_memory.py", ("speed_memory.json", "speed_memory.png")),
             Benchmark("peers", folder / "peers.py", ("peers.json", "peers.png")),
             Benchmark("gpu_scale", folder / "gpu_scale.py", ("gpu_scale.json", "gpu_scale.png"), needs_cuda=True)]
    return [benchmark for benchmark in known if benchmark.script.is_file()]


def reproduce(out_dir="reports", *, notebook_dir="notebooks", quick: bool = False, model_name: str | None = None,
              device: str | None = None, dtype: str | None = None, parameters: dict | None = None,
              force: bool = False, benchmarks: list[Benchmark] | None = None,
              kernel_name: str | None = None, execution_timeout: float | None = None,
              progress: bool = True) -> pd.DataFrame:
    """Run every part (notebooks, then benchmarks) into `out_dir` and write `out_dir/index.html`.

    model_name: passed as the `model_name` parameter to the notebooks that declare it (None: their default, and
    the `MODEL_PASSES` run too; a model given here means one model: no second-model pass).
    device, dtype: passed as the `device` / `dtype` parameters to the notebooks that declare them, e.g. "cuda"
    and "bfloat16" on a GPU (None: their default, CPU float32); checked before anything runs.
    parameters: extra papermill parameters for every notebook; notebooks that declare `interactive` get
    `interactive=False` (`notebooks.HEADLESS_PARAMETERS`). benchmarks: None for `default_benchmarks` of the
    `benchmarks/` folder next to `notebook_dir`; [] for none. execution_timeout: seconds one notebook cell may
    run before its notebook fails (None: no limit).
    Returns one row per part: part, kind, status ("ok", "failed", "skipped" = finished earlier, "not run"),
    seconds, output, error. Never raises for a failing part: check `status`.
    """
    check_device(device, dtype)
    out_dir = Path(out_dir)
    notebooks = runner.find_notebooks(notebook_dir)
    kernel_name = kernel_name or runner.DEFAULT_KERNEL
    runner.check_kernel(kernel_name)
    if benchmarks is None:
        benchmarks = default_benchmarks(Path(notebook_dir).resolve().parent / BENCHMARKS)
    common = runner.common_parameters(out_dir, quick=quick, parameters=parameters)
    optional = dict(runner.HEADLESS_PARAMETERS)
    optional |= {name: value for name, value in zip(MODEL_PARAMETERS, (model_name, device, dtype)) if value is not None}
    out_dir.mkdir(parents=True, exist_ok=True)

    first = [notebook for notebook in notebooks if notebook.stem not in AFTER_MODEL_PASSES]
    last = [notebook for notebook in notebooks if notebook.stem in AFTER_MODEL_PASSES]
    passes = [] if model_name is not None else [
        (model_pass, [notebook for notebook in notebooks if notebook.stem in model_pass.notebooks])
        for model_pass in MODEL_PASSES]
    total = len(notebooks) + sum(len(chosen) for _, chosen in passes) + len(benchmarks)

    def notebook_part(notebook, folder, injected, part=None):
        bar.set_postfix_str(part or notebook.name)
        where = {"record_dir": out_dir, "part": part}
        if not force and runner.finished(notebook, folder, injected, **where):
            row = runner.skipped_row(notebook, folder, **where)
        else:
            row = runner.run_notebook(notebook, folder, injected, kernel_name, execution_timeout=execution_timeout,
                                      **where)
        rows.append({"part": row["notebook"], "kind": "notebook", "status": row["status"],
                     "seconds": row["seconds"], "output": row["html"] or row["executed"], "error": row["error"]})
        bar.update()

    rows = []
    bar = tqdm(total=total, desc="reproduce", unit="part", disable=not progress)
    try:
        for notebook in first:
            notebook_part(notebook, out_dir, runner.notebook_parameters(notebook, common, optional))
        for model_pass, chosen in passes:
            folder = model_pass.folder(out_dir)
            missing = _missing_model(model_pass.model_name)
            pass_common = runner.common_parameters(folder, quick=quick, parameters=parameters)
            pass_optional = optional | {MODEL_PARAMETERS[0]: model_pass.model_name}
            for notebook in chosen:
                if missing:
                    rows.append(_not_run_notebook(out_dir, model_pass.part(notebook), missing))
                    bar.update()
                    continue
                injected = runner.notebook_parameters(notebook, pass_common, pass_optional)
                notebook_part(notebook, folder, injected, model_pass.part(notebook))
        for notebook in last:
            notebook_part(notebook, out_dir, runner.notebook_parameters(notebook, common, optional))
        for benchmark in benchmarks:
            bar.set_postfix_str(benchmark.name)
            rows.append(_benchmark_part(benchmark, out_dir, quick, force))
            bar.update()
    finally:
        bar.close()
        write_index(out_dir)
    return pd.DataFrame(rows, columns=["part", "kind", "status", "seconds", "output", "error"])


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
def _benchmark_part(benchmark: Benchmark, out_dir: Path, quick: bool, force: bool) -> dict:
    folder = out_dir / BENCHMARKS
    parameters = {"quick": bool(quick), "out": str(folder.resolve()),
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
    entry = run_benchmark(benchmark, folder, quick) | {"parameters": parameters}
    runner.update_run_record(out_dir, "benchmarks", benchmark.name, entry | {"finished_at": _now()})
    return row | {"status": entry["status"], "seconds": entry["seconds"], "error": entry["error"]}


def run_benchmark(benchmark: Benchmark, folder: Path, quick: bool) -> dict:
    """Run one benchmark script into `folder`; its stdout and stderr go to `folder/NAME.log`.

    Returns status ("ok"/"failed", or "not run" when the script exits with NOT_RUN: it could not run here, and
    its last log line says why), seconds, error (exit code and the log's last lines), command, log, outputs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{benchmark.name}.log"
    command = benchmark.command(folder.resolve(), quick)
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
    partial = path.with_name(f".{INDEX}.tmp")
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)
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
    """The run's headline numbers from `<out>/figures/*.csv`: SnapKV's hit rate with and without the attention
    sinks (01), needle retention per method relative to the full cache (06), decode speed-up and memory at the
    longest prompt (08). A finding whose CSV is missing or unreadable says so instead of a number."""
    figures = Path(out_dir) / FIGURES
    findings = []
    for compute in (_hit_rate_findings, _needle_findings, _speed_findings):
        try:
            findings += compute(figures)
        except Exception as error:  # noqa: BLE001 (one unreadable CSV must not cost the page)
            name = compute.__name__.removeprefix("_").removesuffix("_findings")
            findings.append(Finding(name, f"{name}: could not be computed ({type(error).__name__}: {error})",
                                    None, ""))
    return findings


def _read_csv(figures: Path, name: str) -> pd.DataFrame | None:
    path = figures / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def _hit_rate_findings(figures: Path) -> list[Finding]:
    name = "01_hit_rate_along_generation"
    table = _read_csv(figures, name)
    if table is None:
        return [Finding("hit_rate", "Hit rate: notebook 01 has not written its CSV in this run.", None, name)]
    protocol = "reference" if "reference" in set(table.protocol) else sorted(set(table.protocol))[0]
    table = table[table.protocol == protocol]
    sums = table.groupby("reference")[["hits", "important", "hits_no_sinks", "important_no_sinks"]].sum()
    rate = sums.hits / sums.important
    no_sinks = sums.hits_no_sinks / sums.important_no_sinks
    others = rate.drop("snapkv", errors="ignore")
    others_no_sinks = no_sinks.drop("snapkv", errors="ignore")
    best = f"; best reference set: {others.idxmax()} {others.max():.2f}" if len(others) else ""
    best_no_sinks = (f"; best reference set: {others_no_sinks.idxmax()} {others_no_sinks.max():.2f}"
                     if len(others_no_sinks.dropna()) else "")
    samples = table["sample"].nunique()
    return [Finding("hit_rate", f"SnapKV hit rate ({protocol} answers, {samples} samples, all layers, heads and answer "
                                f"tokens pooled): {rate['snapkv']:.2f}{best}", float(rate["snapkv"]), name),
            Finding("hit_rate_no_sinks", f"SnapKV hit rate without the attention sinks: {no_sinks['snapkv']:.2f}"
                                         f"{best_no_sinks}", float(no_sinks["snapkv"]), name)]


def _needle_findings(figures: Path) -> list[Finding]:
    from snapkv.analysis.quality.statistics import retention_table

    name = "06_needle"
    table = _read_csv(figures, name)
    if table is None:
        return [Finding("needle", "Needle retention: notebook 06 has not written its CSV in this run.", None, name)]
    table = table[table.task == "needle"]
    mode = "question-aware" if "question-aware" in set(table["mode"]) else sorted(set(table["mode"]))[0]
    table = table[table["mode"] == mode]
    retention = retention_table(table, by=("method",), resamples=200)
    budgets = sorted(table.budget.dropna().astype(int).unique())
    span = f"budgets {budgets[0]}-{budgets[-1]}" if len(budgets) > 1 else f"budget {budgets[0]}" if budgets else ""
    findings = []
    for row in sorted(retention.itertuples(), key=lambda r: -r.retention if pd.notna(r.retention) else 1):
        findings.append(Finding(f"needle_{row.method}", f"Needle retention, {row.method} ({mode}, {span}, "
                                f"{row.prompts} prompts): {row.retention:.0%} of the full cache's score "
                                f"({row.score:.2f} vs {row.full_score:.2f})", float(row.retention), name))
    return findings


def _speed_findings(figures: Path) -> list[Finding]:
    name = "08_speed_memory"
    table = _read_csv(figures, name)
    if table is None:
        return [Finding("speed", "Decode speed and memory: notebook 08 has not written its CSV in this run.",
                        None, name)]
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
        link = (f" (<a href='#figure-{_anchor(finding.figure)}'>figure</a>, "
                f"<a href='{FIGURES}/{html.escape(finding.figure)}.html'>interactive</a>)") if finding.figure else ""
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
        "quick": parameters.get("quick"),
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
