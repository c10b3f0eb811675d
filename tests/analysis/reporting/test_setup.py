"""Notebook setup: settings from the full defaults, a profile's overrides and given parameters."""

from dataclasses import dataclass
from typing import ClassVar

import pytest

from snapkv.analysis.reporting.setup import PROFILES, check_profile, resolve_settings


@dataclass(frozen=True)
class Example:
    size: int = 100
    cut: int | None = None
    name: str = "full"
    DEFAULT: ClassVar[dict] = dict(size=20)
    QUICK: ClassVar[dict] = dict(size=2, cut=10)


def test_resolve_settings_layers_full_defaults_the_profile_and_given_values():
    assert resolve_settings(Example, "full") == Example()
    assert resolve_settings(Example, "default") == Example(size=20)
    assert resolve_settings(Example, "quick") == Example(size=2, cut=10)
    assert resolve_settings(Example, "quick", size=5, cut=None, name="x") == Example(size=5, cut=10, name="x")
    assert resolve_settings(Example, "full", size=0) == Example(size=0)  # falsy but given
    assert resolve_settings(Example, "full", name=["a", "b"]).name == ("a", "b")  # papermill's list: a tuple


def test_a_dataclass_without_a_profile_dict_keeps_its_defaults():
    @dataclass(frozen=True)
    class Plain:
        size: int = 3

    assert [resolve_settings(Plain, profile) for profile in PROFILES] == [Plain()] * 3


@pytest.mark.parametrize("profile, error, message", [
    (True, TypeError, "profile must be one of"), ("fast", ValueError, "unknown profile 'fast'")])
def test_unknown_profiles_are_refused_naming_the_choices(profile, error, message):
    with pytest.raises(error, match=message):
        check_profile(profile)
    with pytest.raises(error, match="'quick', 'default', 'full'"):
        resolve_settings(Example, profile)
