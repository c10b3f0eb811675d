"""Notebook setup: settings from defaults, quick overrides and given parameters."""

from dataclasses import dataclass
from typing import ClassVar

from snapkv.analysis.reporting.setup import resolve_settings


@dataclass(frozen=True)
class Example:
    size: int = 100
    cut: int | None = None
    name: str = "full"
    QUICK: ClassVar[dict] = dict(size=2, cut=10)


def test_resolve_settings_layers_defaults_quick_and_given_values():
    assert resolve_settings(Example, False) == Example()
    assert resolve_settings(Example, True) == Example(size=2, cut=10)
    assert resolve_settings(Example, True, size=5, cut=None, name="x") == Example(size=5, cut=10, name="x")
    assert resolve_settings(Example, False, size=0) == Example(size=0)  # falsy but given
