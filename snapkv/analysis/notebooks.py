"""Run the project's notebooks headless: papermill executes them, nbconvert exports each to HTML.

Every notebook runs in its own folder (as it would in Jupyter) on the ``python3`` kernel, which
jupyter_client starts with the running interpreter, so notebooks see the same installed ``snapkv``.
Papermill injects the parameters ``quick`` and ``reports_dir`` (the absolute output folder), so a
notebook writes its figures to ``Path(reports_dir) / "figures"``.
"""

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

DEFAULT_KERNEL = "python3"
RUN_RECORD = "notebooks.json"
_RECORDED_PACKAGES = ("snapkv", "torch", "transformers", "papermill", "nbconvert", "ipykernel")


def run_notebooks(notebook_dir="notebooks", out_dir="reports", *, parameters=None, quick=False, kernel_name=None):
    """Execute every ``*.ipynb`` in ``notebook_dir`` (sorted by name) and write the results to ``out_dir``.

    For each notebook ``NAME.ipynb`` this writes ``out_dir/NAME.ipynb`` (executed, outputs included)
    and ``out_dir/NAME.html``; ``out_dir/notebooks.json`` records parameters, versions and timings.
    parameters: extra papermill parameters (a dict); they override ``quick`` and ``reports_dir``.
    kernel_name: a Jupyter kernel; default ``python3``, i.e. the running interpreter.

    Returns a DataFrame with one row per notebook (notebook, status, seconds, executed, html, error).
    Raises RuntimeError naming every notebook that failed, after all of them have run and their
    partial outputs have been written.
    """
    notebook_dir = Path(notebook_dir)
    out_dir = Path(out_dir)
    if parameters is not None and not isinstance(parameters, dict):
        raise TypeError(f"parameters must be a dict of notebook parameters, not {type(parameters).__name__}")
    if not notebook_dir.is_dir():
        raise ValueError(f"notebook_dir {str(notebook_dir)!r} is not a folder.")
    notebooks = sorted(notebook_dir.glob("*.ipynb"))
    if not notebooks:
        raise ValueError(f"notebook_dir {str(notebook_dir)!r} holds no *.ipynb notebook.")
    kernel_name = kernel_name or DEFAULT_KERNEL
    _check_kernel(kernel_name)

    out_dir.mkdir(parents=True, exist_ok=True)
    injected = {"quick": bool(quick), "reports_dir": str(out_dir.resolve()), **(parameters or {})}
    rows = []
    progress = tqdm(notebooks, desc="notebooks", unit="notebook")
    for notebook in progress:
        progress.set_postfix_str(notebook.name)
        rows.append(_run_one(notebook, out_dir, injected, kernel_name))
    progress.close()

    runs = pd.DataFrame(rows)
    _write_run_record(out_dir / RUN_RECORD, injected, kernel_name, runs)
    failed = runs[runs.status == "failed"]
    if len(failed):
        lines = [f"  {row.notebook}: {row.error} (see {row.html or row.executed})" for row in failed.itertuples()]
        raise RuntimeError(f"{len(failed)} of {len(runs)} notebook(s) failed:\n" + "\n".join(lines))
    return runs


def export_html(executed_notebook) -> Path:
    """Write ``NAME.html`` next to an executed ``NAME.ipynb`` (outputs and figures embedded)."""
    import nbformat
    from nbconvert import HTMLExporter

    executed_notebook = Path(executed_notebook)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed_notebook, as_version=4))
    html = executed_notebook.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def _run_one(notebook: Path, out_dir: Path, parameters: dict, kernel_name: str) -> dict:
    import papermill

    executed = out_dir / notebook.name
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
    return {
        "notebook": notebook.name,
        "status": "failed" if error else "ok",
        "seconds": round(seconds, 2),
        "executed": str(executed) if executed.is_file() else None,
        "html": str(html) if html else None,
        "error": error,
    }


def _check_kernel(kernel_name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise RuntimeError(
            f"Jupyter kernel {kernel_name!r} not found. Install one for this interpreter with: "
            f"{sys.executable} -m ipykernel install --user --name {kernel_name}"
        ) from None


def _write_run_record(path: Path, parameters: dict, kernel_name: str, runs: pd.DataFrame) -> None:
    versions = {}
    for package in _RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    record = {
        "parameters": parameters,
        "kernel": kernel_name,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "notebooks": runs.to_dict(orient="records"),
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
