"""Saving results with their settings: every figure goes out as PNG + interactive HTML + CSV + JSON."""

import datetime
import json
import os
import platform
from pathlib import Path

import pandas as pd
import torch


def environment(model=None) -> dict:
    """Model, versions, device and date, stored next to every result."""
    import transformers

    import snapkv

    info = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "snapkv_version": snapkv.__version__,
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if model is not None:
        parameter = next(model.parameters(), None)
        info |= {
            "model_id": getattr(model.config, "_name_or_path", None) or None,
            "model_type": getattr(model.config, "model_type", None),
            "dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
            "device": str(parameter.device) if parameter is not None else None,
        }
    return info


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
