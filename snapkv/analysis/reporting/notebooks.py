"""Run the project's notebooks headless: papermill executes them, nbconvert exports each to HTML.

Every notebook runs in its own folder (as it would in Jupyter) on the ``python3`` kernel, which
jupyter_client starts with the running interpreter, so notebooks see the same installed ``snapkv``.
Papermill injects the parameters ``quick`` and ``reports_dir`` (the absolute output folder), so a
notebook writes its figures to ``Path(reports_dir) / "figures"``.

``out_dir/notebooks.json`` is the run record, updated after every notebook (so an interrupted run keeps
what finished): per notebook its status, error, timings, the exact parameters it ran with and the sha256
of its source. A notebook counts as *finished* when that entry says "ok" with the same parameters and
source, and its executed copy exists and carries no papermill error; ``run_notebooks(..., force=False)``
and ``snapkv reproduce`` skip finished notebooks.
"""

import datetime
import hashlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

DEFAULT_KERNEL = "python3"
RUN_RECORD = "notebooks.json"
# Given to the notebooks that declare them: widgets do not render in a headless run, and ipywidgets' Output
# capture has been seen to leave nbclient waiting forever for a cell's reply, so such notebooks skip them.
HEADLESS_PARAMETERS = {"interactive": False}
_RECORDED_PACKAGES = ("snapkv", "torch", "transformers", "papermill", "nbconvert", "ipykernel")


def run_notebooks(notebook_dir="notebooks", out_dir="reports", *, parameters=None, quick=False, kernel_name=None,
                  optional_parameters=None, force=True, execution_timeout=None):
    """Execute every ``*.ipynb`` in ``notebook_dir`` (sorted by name) and write the results to ``out_dir``.

    For each notebook ``NAME.ipynb`` this writes ``out_dir/NAME.ipynb`` (executed, outputs included)
    and ``out_dir/NAME.html``; ``out_dir/notebooks.json`` records parameters, versions and timings.
    parameters: extra papermill parameters (a dict), given to every notebook; they override ``quick``
        and ``reports_dir``.
    optional_parameters: papermill parameters (a dict) given only to the notebooks whose parameters cell
        declares them (e.g. ``model_name``), after ``HEADLESS_PARAMETERS`` (``interactive=False``).
    force: run every notebook; False skips the finished ones (see the module docstring).
    execution_timeout: seconds one cell may run before its notebook fails (None: no limit).
    kernel_name: a Jupyter kernel; default ``python3``, i.e. the running interpreter.

    Returns a DataFrame with one row per notebook (notebook, status, seconds, executed, html, error);
    status is "ok", "failed" or "skipped" (finished earlier). Raises RuntimeError naming every notebook
    that failed, after all of them have run and their partial outputs have been written.
    """
    notebooks = find_notebooks(notebook_dir)
    kernel_name = kernel_name or DEFAULT_KERNEL
    check_kernel(kernel_name)
    out_dir = Path(out_dir)
    common = common_parameters(out_dir, quick=quick, parameters=parameters)
    _check_dict("optional_parameters", optional_parameters)
    optional = {**HEADLESS_PARAMETERS, **(optional_parameters or {})}
    rows = []
    progress = tqdm(notebooks, desc="notebooks", unit="notebook")
    for notebook in progress:
        progress.set_postfix_str(notebook.name)
        injected = notebook_parameters(notebook, common, optional)
        if not force and finished(notebook, out_dir, injected):
            rows.append(skipped_row(notebook, out_dir))
            continue
        rows.append(run_notebook(notebook, out_dir, injected, kernel_name, execution_timeout=execution_timeout))
    progress.close()

    runs = pd.DataFrame(rows)
    failed = runs[runs.status == "failed"]
    if len(failed):
        lines = [f"  {row.notebook}: {row.error} (see {row.html or row.executed})" for row in failed.itertuples()]
        raise RuntimeError(f"{len(failed)} of {len(runs)} notebook(s) failed:\n" + "\n".join(lines))
    return runs


def find_notebooks(notebook_dir) -> list[Path]:
    """The ``*.ipynb`` files of ``notebook_dir``, sorted by name; ValueError for a missing or empty folder."""
    notebook_dir = Path(notebook_dir)
    if not notebook_dir.is_dir():
        raise ValueError(f"notebook_dir {str(notebook_dir)!r} is not a folder.")
    notebooks = sorted(notebook_dir.glob("*.ipynb"))
    if not notebooks:
        raise ValueError(f"notebook_dir {str(notebook_dir)!r} holds no *.ipynb notebook.")
    return notebooks


def common_parameters(out_dir, *, quick=False, parameters=None) -> dict:
    """The parameters every notebook gets: quick, reports_dir (absolute), then ``parameters``."""
    _check_dict("parameters", parameters)
    return {"quick": bool(quick), "reports_dir": str(Path(out_dir).resolve()), **(parameters or {})}


def declared_parameters(notebook) -> set[str]:
    """Names assigned in the notebook's ``parameters``-tagged cell (empty when it has none)."""
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def notebook_parameters(notebook, common: dict, optional: dict | None = None) -> dict:
    """``common``, plus the ``optional`` parameters the notebook declares."""
    if not optional:
        return dict(common)
    declared = declared_parameters(notebook)
    return {**common, **{name: value for name, value in optional.items() if name in declared}}


def source_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def finished(notebook, out_dir, parameters: dict) -> bool:
    """True when ``notebook`` already ran into ``out_dir`` successfully, with these parameters and its
    current source: the run record says so and the executed copy exists and carries no papermill error."""
    import nbformat

    notebook, out_dir = Path(notebook), Path(out_dir)
    entry = read_run_record(out_dir).get("notebooks", {}).get(notebook.name)
    executed = out_dir / notebook.name
    if not entry or entry.get("status") != "ok" or not executed.is_file():
        return False
    if _normalized(entry.get("parameters")) != _normalized(parameters):
        return False
    if entry.get("source_sha256") != source_sha256(notebook):
        return False
    try:
        papermill_metadata = nbformat.read(executed, as_version=4).metadata.get("papermill", {})
    except Exception:  # noqa: BLE001 (an unreadable executed copy is not a finished run)
        return False
    if papermill_metadata.get("exception"):
        return False
    return _normalized(papermill_metadata.get("parameters")) == _normalized(parameters)


def skipped_row(notebook, out_dir) -> dict:
    """The row of a notebook skipped because it had finished (its recorded outputs, status "skipped")."""
    notebook, out_dir = Path(notebook), Path(out_dir)
    entry = read_run_record(out_dir)["notebooks"][notebook.name]
    html = out_dir / notebook.with_suffix(".html").name
    return {"notebook": notebook.name, "status": "skipped", "seconds": entry.get("seconds"),
            "executed": str(out_dir / notebook.name), "html": str(html) if html.is_file() else None, "error": None}


def run_notebook(notebook, out_dir, parameters: dict, kernel_name: str = DEFAULT_KERNEL, *,
                 execution_timeout: float | None = None) -> dict:
    """Execute one notebook into ``out_dir`` (NAME.ipynb + NAME.html) and record it in the run record.

    execution_timeout: seconds one cell may run before the notebook fails (None: no limit).

    Returns its row (notebook, status "ok"/"failed", seconds, executed, html, error); never raises for a
    failing notebook.
    """
    import papermill

    notebook, out_dir = Path(notebook), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / notebook.name
    source_hash = source_sha256(notebook)  # of the source that runs, should the file change meanwhile
    start = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(
            str(notebook),
            str(executed),
            parameters=parameters,
            kernel_name=kernel_name,
            cwd=str(notebook.parent),
            progress_bar=False,
            execution_timeout=execution_timeout,
        )
    except papermill.PapermillExecutionError as failure:
        error = f"cell {failure.exec_count}: {failure.ename}: {failure.evalue}"
    except Exception as failure:  # noqa: BLE001 (kernel died, timeout, bad notebook: reported like a cell error)
        error = f"{type(failure).__name__}: {failure}"
    seconds = time.perf_counter() - start
    html = None
    if executed.is_file():
        try:
            html = export_html(executed)
        except Exception as failure:  # noqa: BLE001 (a failed export is reported with the notebook)
            error = error or f"HTML export failed: {type(failure).__name__}: {failure}"
    row = {
        "notebook": notebook.name,
        "status": "failed" if error else "ok",
        "seconds": round(seconds, 2),
        "executed": str(executed) if executed.is_file() else None,
        "html": str(html) if html else None,
        "error": error,
    }
    update_run_record(out_dir, "notebooks", notebook.name, row | {
        "parameters": parameters, "source": str(notebook.resolve()), "source_sha256": source_hash,
        "kernel": kernel_name, "finished_at": _now(),
    }, parameters={k: v for k, v in parameters.items() if k in ("quick", "reports_dir")})
    return row


def export_html(executed_notebook) -> Path:
    """Write ``NAME.html`` next to an executed ``NAME.ipynb`` (outputs and figures embedded)."""
    import nbformat
    from nbconvert import HTMLExporter

    executed_notebook = Path(executed_notebook)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed_notebook, as_version=4))
    html = executed_notebook.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def check_kernel(kernel_name: str) -> None:
    """RuntimeError, with the command that installs one, when the Jupyter kernel does not exist."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise RuntimeError(
            f"Jupyter kernel {kernel_name!r} not found. Install one for this interpreter with: "
            f"{sys.executable} -m ipykernel install --user --name {kernel_name}"
        ) from None


# -- the run record --------------------------------------------------------------------------------
def read_run_record(out_dir) -> dict:
    """``out_dir/notebooks.json`` with its "notebooks" (and "benchmarks") lists turned into dicts by name;
    an empty record when the file is missing or unreadable."""
    path = Path(out_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    for kind, key in (("notebooks", "notebook"), ("benchmarks", "benchmark")):
        entries = record.get(kind) or []
        record[kind] = {entry[key]: entry for entry in entries if isinstance(entry, dict) and key in entry}
    return record


def update_run_record(out_dir, kind: str, name: str, entry: dict, parameters: dict | None = None) -> dict:
    """Replace the ``kind`` ("notebooks" or "benchmarks") entry ``name`` in the run record, refresh the
    environment, and write the file atomically. Entries of other parts are kept."""
    out_dir = Path(out_dir)
    record = read_run_record(out_dir)
    key = "notebook" if kind == "notebooks" else "benchmark"
    record[kind][name] = {key: name, **{k: v for k, v in entry.items() if k != key}}
    record.update(run_environment())
    if parameters is not None:
        record["parameters"] = parameters
    record["updated"] = _now()
    for part_kind in ("notebooks", "benchmarks"):
        record[part_kind] = [record[part_kind][n] for n in sorted(record[part_kind])]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_RECORD
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    partial.replace(path)
    return record


def run_environment() -> dict:
    """Interpreter, platform, package versions, CPU and GPU of this machine, for the run record."""
    versions = {}
    for package in _RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "machine": machine_description(),
    }


def machine_description() -> dict:
    """CPU model and count, memory, and the CUDA device (None without one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    except ImportError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gib": round(memory, 1) if memory else None, "gpu": gpu}


def _normalized(value):
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _check_dict(name: str, value) -> None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of notebook parameters, not {type(value).__name__}")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
