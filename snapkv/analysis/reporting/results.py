"""Saving results with their settings: every figure goes out as PNG + interactive HTML + CSV + JSON.

The interactive HTML works offline: it loads plotly.js from one shared `plotly.min.js` written next to it
(about 4.7 MB once per folder, instead of a copy inside every figure or a CDN that a cluster or a plane cannot
reach)."""

import json
from pathlib import Path

import pandas as pd

from snapkv.core.environment import environment
from snapkv.core.files import atomic_path

PLOTLY_JS = "plotly.min.js"


def write_plotly_js(folder) -> Path:
    """Write `folder/plotly.min.js`, the plotly.js of the installed plotly package, unless it is already there
    (the same file). Returns its path."""
    from plotly.offline import get_plotlyjs

    path = Path(folder) / PLOTLY_JS
    source = get_plotlyjs().encode("utf-8")
    if path.is_file() and path.stat().st_size == len(source) and path.read_bytes() == source:
        return path
    with atomic_path(path) as partial:
        partial.write_bytes(source)
    return path


def write_interactive_html(figure, path) -> Path:
    """Write a plotly figure as a standalone page that loads the shared `plotly.min.js` next to it (written
    when missing): it opens offline, from a file:// URL or any web server."""
    path = Path(path)
    write_plotly_js(path.parent)
    figure.write_html(path, include_plotlyjs=PLOTLY_JS, full_html=True)
    return path


def save_result(name: str, data: pd.DataFrame, figure, interactive, settings: dict, out_dir, model=None) -> dict:
    """Write out_dir/NAME.png (seaborn), NAME.html (plotly, loading out_dir/plotly.min.js), NAME.csv (the data)
    and NAME.json (settings + environment). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{name}.{kind}" for kind in ("png", "html", "csv", "json")}
    figure.savefig(paths["png"], dpi=130, bbox_inches="tight")
    write_interactive_html(interactive, paths["html"])
    data.to_csv(paths["csv"], index=False)
    record = {"name": name, "settings": settings, "environment": environment(model), "rows": len(data)}
    paths["json"].write_text(json.dumps(record, indent=2, default=str))
    return paths
