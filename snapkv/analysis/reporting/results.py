"""Saving results with their settings: every figure goes out as PNG + interactive HTML + CSV + JSON."""

import json
from pathlib import Path

import pandas as pd

from snapkv.core.environment import environment


def save_result(name: str, data: pd.DataFrame, figure, interactive, settings: dict, out_dir, model=None) -> dict:
    """Write out_dir/NAME.png (seaborn), NAME.html (plotly), NAME.csv (the data) and NAME.json
    (settings + environment). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{name}.{kind}" for kind in ("png", "html", "csv", "json")}
    figure.savefig(paths["png"], dpi=130, bbox_inches="tight")
    interactive.write_html(paths["html"], include_plotlyjs="cdn")
    data.to_csv(paths["csv"], index=False)
    record = {"name": name, "settings": settings, "environment": environment(model), "rows": len(data)}
    paths["json"].write_text(json.dumps(record, indent=2, default=str))
    return paths
