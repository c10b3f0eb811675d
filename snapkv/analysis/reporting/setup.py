"""What every notebook does first, in one place: resolve its settings (defaults, quick-mode overrides,
the parameters papermill passed), seed torch, load the model and make the figures folder.

A notebook's parameters cell gives `None` for "the default"; `resolve_settings` fills those from the
family's frozen settings dataclass, whose `QUICK` dict holds what a quick run changes.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from snapkv.core import load_model


def resolve_settings(kind, quick: bool, **given):
    """`kind(...)` (a frozen settings dataclass): its defaults, then `kind.QUICK` when quick, then every
    `given` value that is not None (an explicit value wins over quick mode)."""
    values = dict(kind.QUICK) if quick else {}
    values |= {name: value for name, value in given.items() if value is not None}
    return kind(**values)


@dataclass(frozen=True)
class Notebook:
    """A notebook's model, tokenizer and figures folder (reports_dir/figures)."""

    model: object
    tokenizer: object
    figures: Path


def setup(*, reports_dir, model_name: str | None = None, device: str = "cpu", dtype: str = "float32",
          seed: int = 0, threads: int | None = None) -> Notebook:
    """Set torch's CPU threads (None: torch's default), seed torch, load the model (None: the embedded
    SmolLM2-135M-Instruct) and create reports_dir/figures."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    figures = Path(reports_dir) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    return Notebook(model, tokenizer, figures)
