"""What every notebook does first, in one place: resolve its settings (the profile's sizes, the parameters
papermill passed), seed torch, load the model and make the figures folder.

Three profiles size every experiment (`snapkv reproduce`, `--full`, `--quick`):
- "full": paper scale, the field defaults of each family's frozen settings dataclass (meant for a GPU);
- "default": what each figure needs to show its finding, in about 30 minutes for the whole main job on a 2-core
  CPU. The rule for its sample counts: a headline number must carry a 95% interval narrow enough for the
  finding it supports (a hit rate within about +-0.05 of its mean; an accuracy whose interval separates the
  methods the reading compares, or the reading says they tie); everything that does not carry a finding
  (pooling variants, random eviction, every budget, the longest prompts) is left to "full". Each dataclass's
  `DEFAULT` dict holds what the default profile changes;
- "quick": a smoke run of tiny prompts and one or two samples (the test suite's), `QUICK`.
A notebook's parameters cell gives `None` for "the profile's value"; an explicit value wins over the profile.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from snapkv.core import load_model

PROFILES = ("quick", "default", "full")


def check_profile(profile) -> str:
    """`profile` itself when it is one of PROFILES; else TypeError/ValueError."""
    if not isinstance(profile, str):
        raise TypeError(f"profile must be one of {', '.join(map(repr, PROFILES))}, got {type(profile).__name__} "
                        f"({profile!r})")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose from {', '.join(map(repr, PROFILES))}")
    return profile


def profile_overrides(kind, profile: str) -> dict:
    """What `profile` changes in `kind`'s defaults: `kind.QUICK`, `kind.DEFAULT` or nothing (full)."""
    return {"quick": getattr(kind, "QUICK", {}), "default": getattr(kind, "DEFAULT", {}),
            "full": {}}[check_profile(profile)]


def resolve_settings(kind, profile: str, **given):
    """`kind(...)` (a frozen settings dataclass): its defaults (the full profile), then what `profile` changes
    (`profile_overrides`), then every `given` value that is not None (an explicit value wins; a list, as papermill
    passes a sequence, becomes a tuple)."""
    values = dict(profile_overrides(kind, profile))
    values |= {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()
               if value is not None}
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
