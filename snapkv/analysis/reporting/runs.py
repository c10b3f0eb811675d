"""The runs one reports folder holds: the main pass (`<reports>/figures`) and each second model's pass
(`<reports>/models/NAME/figures`, see `reproduce.MODEL_PASSES`), and one figure's CSV read from all of them
with a `model` column, for the notebooks that compare models."""

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

FIGURES = "figures"
MODELS = "models"


@dataclass(frozen=True)
class Run:
    """One pass of a reports folder: `folder` holds its figures; `label` names its model."""

    label: str
    folder: Path


def model_runs(reports_dir) -> list[Run]:
    """The main pass first, then each `models/NAME` pass that has a figures folder: the embedded models by size
    (their order in `loading.EMBEDDED_MODEL_NAMES`), then any other by name. A pass's label is the model_id its
    figures' JSON records (else NAME; "default model" for the main pass)."""
    from snapkv.core.loading import EMBEDDED_MODEL_NAMES

    reports_dir = Path(reports_dir)
    runs = [Run(_model_id(reports_dir / FIGURES) or "default model", reports_dir / FIGURES)]
    folders = sorted((reports_dir / MODELS).glob(f"*/{FIGURES}"), key=lambda folder: (
        EMBEDDED_MODEL_NAMES.index(folder.parent.name) if folder.parent.name in EMBEDDED_MODEL_NAMES
        else len(EMBEDDED_MODEL_NAMES), folder.parent.name))
    for folder in folders:
        runs.append(Run(_model_id(folder) or folder.parent.name, folder))
    return runs


def _model_id(folder: Path) -> str | None:
    for path in sorted(folder.glob("*.json")):
        try:
            model_id = json.loads(path.read_text(encoding="utf-8")).get("environment", {}).get("model_id")
        except (OSError, ValueError, AttributeError):
            continue
        if model_id:
            return str(model_id)
    return None


def read_across_models(reports_dir, name: str) -> tuple[pd.DataFrame, list[str]]:
    """Figure `name`'s CSV from every run of `reports_dir`, stacked with a `model` column (runs in
    `model_runs` order), and the labels of the runs that have no such CSV (empty frame when none has)."""
    frames, missing = [], []
    for run in model_runs(reports_dir):
        path = run.folder / f"{name}.csv"
        if path.is_file():
            frames.append(pd.read_csv(path).assign(model=run.label))
        else:
            missing.append(run.label)
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), missing
