"""Every notebook runs headless in quick mode and writes its figures."""

import json

import pytest

from snapkv.analysis.notebooks import run_notebooks

pytestmark = pytest.mark.slow


def test_all_notebooks_run_in_quick_mode(tmp_path):
    runs = run_notebooks("notebooks", tmp_path, quick=True)
    assert (runs.status == "ok").all(), runs[["notebook", "status", "error"]]
    figures = tmp_path / "figures"
    for name in ("01_hit_rate_along_generation", "02_windows_along_prompt", "03_questions_same_document",
                 "04_question_position", "05_heads", "05_voting_variants"):
        for kind in ("png", "html", "csv", "json"):
            assert (figures / f"{name}.{kind}").stat().st_size > 0, f"{name}.{kind}"
        settings = json.loads((figures / f"{name}.json").read_text())
        assert settings["environment"]["model_id"] == "SmolLM2-135M-Instruct"
        assert settings["settings"]["n_samples"] >= 1
    assert (tmp_path / "01_hit_rate_along_generation.html").exists()
