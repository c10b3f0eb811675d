"""Run the project's notebooks headless: papermill executes them, nbconvert exports each to HTML.

Every notebook runs in its own folder (as it would in Jupyter) on the ``python3`` kernel, which
jupyter_client starts with the running interpreter, so notebooks see the same installed ``snapkv``.
Papermill injects the parameters ``profile`` ("quick", "default" or "full": `setup.PROFILES`) and
``reports_dir`` (the absolute output folder), so a notebook writes its figures to ``Path(reports_dir) / "figures"``.

``out_dir/notebooks.json`` is the run record, updated after every notebook (so an interrupted run keeps
what finished): per notebook its status, error, timings, the exact parameters it ran with and the sha256
of its source. A notebook counts as *finished* when that entry says "ok" with the same parameters and
source, and its executed copy exists and carries no papermill error; ``run_notebooks(..., force=False)``
and ``snapkv reproduce`` skip finished notebooks.
"""

import datetime
import fcntl
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from snapkv.core.environment import machine_description, package_versions
from snapkv.core.files import atomic_write_text

DEFAULT_KERNEL = "python3"
RUN_RECORD = "notebooks.json"
# Given to the notebooks that declare them: widgets do not render in a headless run, and ipywidgets' Output
# capture has been seen to leave nbclient waiting forever for a cell's reply, so such notebooks skip them.
HEADLESS_PARAMETERS = {"interactive": False}
_RECORDED_PACKAGES = ("snapkv", "torch", "transformers", "papermill", "nbconvert", "ipykernel")


def run_notebooks(notebook_dir="notebooks", out_dir="reports", *, parameters=None, profile="default", kernel_name=None,
                  optional_parameters=None, force=True, execution_timeout=None):
    """Execute every ``*.ipynb`` in ``notebook_dir`` (sorted by name) and write the results to ``out_dir``.

    For each notebook ``NAME.ipynb`` this writes ``out_dir/NAME.ipynb`` (executed, outputs included)
    and ``out_dir/NAME.html``; ``out_dir/notebooks.json`` records parameters, versions and timings.
    parameters: extra papermill parameters (a dict), given to every notebook; they override ``profile``
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
    common = common_parameters(out_dir, profile=profile, parameters=parameters)
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


def common_parameters(out_dir, *, profile="default", parameters=None) -> dict:
    """The parameters every notebook gets: profile, reports_dir (absolute), then ``parameters``."""
    from snapkv.analysis.reporting.setup import check_profile

    _check_dict("parameters", parameters)
    return {"profile": check_profile(profile), "reports_dir": str(Path(out_dir).resolve()), **(parameters or {})}


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


def finished(notebook, out_dir, parameters: dict, *, record_dir=None, part: str | None = None) -> bool:
    """True when ``notebook`` already ran into ``out_dir`` successfully, with these parameters and its
    current source: the run record says so and the executed copy exists and carries no papermill error.

    record_dir, part: the run record's folder (default ``out_dir``) and the notebook's name in it (default
    its file name; e.g. ``gemma-3-270m/01_hit_rate_along_generation.ipynb`` for a second model's pass)."""
    import nbformat

    notebook, out_dir = Path(notebook), Path(out_dir)
    record_dir = Path(record_dir) if record_dir is not None else out_dir
    entry = read_run_record(record_dir).get("notebooks", {}).get(part or notebook.name)
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


def skipped_row(notebook, out_dir, *, record_dir=None, part: str | None = None) -> dict:
    """The row of a notebook skipped because it had finished (its recorded outputs, status "skipped");
    record_dir and part as in `finished`."""
    notebook, out_dir = Path(notebook), Path(out_dir)
    record_dir = Path(record_dir) if record_dir is not None else out_dir
    entry = read_run_record(record_dir)["notebooks"][part or notebook.name]
    html = out_dir / notebook.with_suffix(".html").name
    return {"notebook": part or notebook.name, "status": "skipped", "seconds": entry.get("seconds"),
            "executed": str(out_dir / notebook.name), "html": str(html) if html.is_file() else None, "error": None}


def run_notebook(notebook, out_dir, parameters: dict, kernel_name: str = DEFAULT_KERNEL, *,
                 execution_timeout: float | None = None, record_dir=None, part: str | None = None) -> dict:
    """Execute one notebook into ``out_dir`` (NAME.ipynb + NAME.html) and record it in the run record.

    execution_timeout: seconds one cell may run before the notebook fails (None: no limit).
    record_dir, part: the run record's folder (default ``out_dir``) and the notebook's name in it (default its
    file name); a notebook recorded elsewhere leaves the record's run-wide parameters as they are.

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
    record_dir = Path(record_dir) if record_dir is not None else out_dir
    row = {
        "notebook": part or notebook.name,
        "status": "failed" if error else "ok",
        "seconds": round(seconds, 2),
        "executed": str(executed) if executed.is_file() else None,
        "html": str(html) if html else None,
        "error": error,
    }
    run_wide = {k: v for k, v in parameters.items() if k in ("profile", "reports_dir")}
    update_run_record(record_dir, "notebooks", row["notebook"], row | {
        "parameters": parameters, "source": str(notebook.resolve()), "source_sha256": source_hash,
        "kernel": kernel_name, "finished_at": _now(),
    }, parameters=run_wide if record_dir.resolve() == out_dir.resolve() else None)
    return row


def export_html(executed_notebook, plotly_js_dir=None) -> Path:
    """Write ``NAME.html`` next to an executed ``NAME.ipynb`` (outputs and figures embedded) that works offline.

    nbconvert's ``lab`` template loads require.js, MathJax, mermaid and the widget manager from CDNs; this page
    loads nothing from the network: plotly outputs (``application/vnd.plotly.v1+json``) are drawn with the
    shared ``plotly.min.js`` of ``plotly_js_dir`` (default: the ``figures`` folder next to the notebook; written
    when missing, linked by a relative path), widget outputs (e.g. tqdm progress bars) are rendered as static
    HTML from the widget state saved in the notebook, and math is left as written (the notebooks have none).
    """
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    from snapkv.analysis.reporting.results import write_plotly_js

    executed_notebook = Path(executed_notebook)
    html = executed_notebook.with_suffix(".html")
    notebook = nbformat.read(executed_notebook, as_version=4)
    has_plotly = offline_outputs(notebook)
    resources = {}
    if has_plotly:
        plotly_js = write_plotly_js(Path(plotly_js_dir) if plotly_js_dir else executed_notebook.parent / "figures")
        resources["plotly_js_url"] = Path(os.path.relpath(plotly_js.resolve(), html.parent.resolve())).as_posix()
    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({OFFLINE_TEMPLATE: _OFFLINE_TEMPLATE})],
                            template_file=OFFLINE_TEMPLATE)
    body, _ = exporter.from_notebook_node(notebook, resources=resources)
    html.write_text(body, encoding="utf-8")
    return html


OFFLINE_TEMPLATE = "snapkv_offline.html.j2"
# nbconvert's lab page without its CDN scripts (require.js, MathJax, mermaid, the widget manager), plus the
# shared plotly.js when the notebook has plotly outputs
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}
{%- if resources.plotly_js_url %}<script src="{{ resources.plotly_js_url }}"></script>{% endif -%}
{%- endblock html_head_js -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"


def offline_outputs(notebook) -> bool:
    """Rewrite, in place, the outputs of an executed notebook (nbformat node) that need a script from the
    network: each plotly figure gets a ``text/html`` that draws it with a page-level ``Plotly`` (no require.js,
    no CDN), each widget view becomes static HTML of its saved state (or its ``text/plain``), and the widget
    state leaves the metadata. Returns True when the notebook has a plotly output."""
    import plotly.io as pio

    state = notebook.metadata.pop("widgets", {}).get(WIDGET_STATE_MIME, {}).get("state", {})
    has_plotly = False
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data")
            if not data:
                continue
            if PLOTLY_MIME in data:
                has_plotly = True
                data["text/html"] = pio.to_html(dict(data[PLOTLY_MIME]), include_plotlyjs=False, full_html=False,
                                                validate=False, config={"responsive": True})
            if WIDGET_VIEW_MIME in data:
                view = data.pop(WIDGET_VIEW_MIME)
                static = _widget_html(view.get("model_id"), state)
                if static is not None:
                    data["text/html"] = static
                    data.pop("text/plain", None)
    return has_plotly


def _widget_html(model_id, state: dict, depth: int = 0) -> str | None:
    """Static HTML for a saved widget (boxes, HTML/Label text and progress bars: what tqdm shows); None for
    any other widget (its text/plain stays)."""
    import html as html_escape

    model = state.get(model_id) if model_id else None
    if not model or depth > 8:
        return None
    name, values = model.get("model_name"), model.get("state", {})
    if name in ("HBoxModel", "VBoxModel", "BoxModel"):
        children = [_widget_html(str(child).removeprefix("IPY_MODEL_"), state, depth + 1)
                    for child in values.get("children", [])]
        if any(child is None for child in children):
            return None
        direction = "row" if name == "HBoxModel" else "column"
        return (f"<div style='display:flex;flex-direction:{direction};gap:0.5em;align-items:center'>"
                + "".join(children) + "</div>")
    if name == "HTMLModel":
        return f"<span>{values.get('value', '')}</span>"
    if name == "LabelModel":
        return f"<span>{html_escape.escape(str(values.get('value', '')))}</span>"
    if name in ("FloatProgressModel", "IntProgressModel"):
        return f"<progress value='{values.get('value', 0)}' max='{values.get('max', 100)}'></progress>"
    return None


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
    environment, and write the file atomically. Entries of other parts are kept; notebooks running side by side
    (worker processes of `snapkv reproduce`) update it one at a time, under a lock file beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f".{RUN_RECORD}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _update_run_record(out_dir, kind, name, entry, parameters)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _update_run_record(out_dir: Path, kind: str, name: str, entry: dict, parameters: dict | None) -> dict:
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
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return record


def run_environment() -> dict:
    """Interpreter, platform, package versions, CPU and GPU of this machine, for the run record."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(_RECORDED_PACKAGES),
        "machine": machine_description(),
    }


def _normalized(value):
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _check_dict(name: str, value) -> None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of notebook parameters, not {type(value).__name__}")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
