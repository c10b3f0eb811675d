"""The main job end to end in the quick profile: every notebook and the CPU benchmark, then the index page."""

import json

import pandas as pd
import pytest

from snapkv.analysis.reporting.reproduce import headline_findings

pytestmark = pytest.mark.slow

OBSERVATION = ("01_hit_rate_along_generation", "01_observation_metrics", "01_sensitivity", "02_windows_along_prompt",
               "03_questions_same_document", "04_question_position", "05_heads", "05_voting_variants")
FIGURES = ("00_quickstart", *OBSERVATION, "06_needle", "06_needle_pooling", "06_needle_tokens", "07_task_calibration",
           "07_task_suite", "08_speed_memory", "09_explorer", "10_cluster_width", "10_cluster_width_tokens",
           "10_cluster_width_hit_rate", "11_kv_packs_speed", "11_kv_packs_quality", "13_your_policy")  # every figure
SECOND_MODEL = "gemma-3-270m"  # its pass: notebooks 01, 03, 06, 07 into models/gemma-3-270m/ (reproduce.MODEL_PASSES)
SECOND_MODEL_FIGURES = ("01_hit_rate_along_generation", "01_observation_metrics", "01_sensitivity",
                        "03_questions_same_document", "06_needle")  # 07's suite needs groups the full cache solves
ACROSS_MODELS = ("12_hit_rate_by_depth", "12_needle_by_model", "12_suite_by_model", "12_kernel_by_model")


def test_reproduce_quick_end_to_end(quick_run):
    tmp_path, runs = quick_run  # reproduce(..., profile="quick"), once per session (conftest.py)
    runs = runs.set_index("part")
    waiting = runs.status == "not run"  # the GPU benchmark without CUDA; the peer benchmark outside the full profile
    assert sorted(runs.index[waiting]) == ["gpu_scale", "peers"], runs[["status", "error"]].to_string()
    assert "profiles do not install the peer" in runs.error["peers"]
    assert (runs.status[~waiting] == "ok").all(), runs[["status", "error"]].to_string()
    figures = tmp_path / "figures"
    for name in FIGURES:
        for kind in ("png", "html", "csv", "json"):
            assert (figures / f"{name}.{kind}").stat().st_size > 0, f"{name}.{kind}"
        record = json.loads((figures / f"{name}.json").read_text())
        model_id = record["environment"].get("model_id") or record["settings"]["trace"]["model_id"]  # 09: no model
        assert model_id == "SmolLM2-135M-Instruct", name
        assert name not in OBSERVATION or record["settings"]["n_samples"] >= 1
    index = (tmp_path / "index.html").read_text()
    assert all(f"{name}.png" in index for name in FIGURES)
    findings = headline_findings(tmp_path)  # the index starts with them, each computed from a CSV
    assert {"hit_rate", "hit_rate_no_sinks", "decode_speedup", "memory"} <= {f.key for f in findings}
    assert any(f.key.startswith("needle_") for f in findings)
    assert all(f.value is not None for f in findings), [f.text for f in findings if f.value is None]
    for finding in findings:  # a headline carries its n and its interval (the speed rows: one measurement each)
        assert finding.key in ("decode_speedup", "memory") or ("95% CI" in finding.text and "n = " in finding.text)
    assert index.index("id='findings'") < index.index("<table")
    # offline: one shared plotly.js beside the figures, no CDN in any page the run writes
    assert (figures / "plotly.min.js").stat().st_size > 1_000_000
    for page in [*figures.glob("*.html"), *tmp_path.glob("*.html")]:
        text = page.read_text()
        assert "cdn.plot.ly" not in text and "cdnjs" not in text and "unpkg.com" not in text, page.name

    # the second model's pass, in its own folder, and the cross-model figures that read both passes
    for notebook in ("01_hit_rate_along_generation", "03_questions_same_document", "06_needle", "07_task_suite"):
        assert runs.status[f"{SECOND_MODEL}/{notebook}.ipynb"] == "ok"
        assert (tmp_path / "models" / SECOND_MODEL / f"{notebook}.html").stat().st_size > 0
        assert f"{SECOND_MODEL}/{notebook}.ipynb" in index
    second = tmp_path / "models" / SECOND_MODEL / "figures"
    for name in SECOND_MODEL_FIGURES:
        record = json.loads((second / f"{name}.json").read_text())
        assert record["environment"]["model_id"] == SECOND_MODEL, name
        assert (second / f"{name}.png").stat().st_size > 0 and (second / f"{name}.csv").stat().st_size > 0
        assert f"models/{SECOND_MODEL}/figures/{name}.png" in index
    assert (second / "plotly.min.js").is_file()  # its pages open offline too
    for page in [*second.glob("*.html"), *second.parent.glob("*.html")]:
        text = page.read_text()
        assert "cdn.plot.ly" not in text and "cdnjs" not in text and "unpkg.com" not in text, page.name
    for name in ACROSS_MODELS:
        for kind in ("png", "html", "csv", "json"):
            assert (figures / f"{name}.{kind}").stat().st_size > 0, f"{name}.{kind}"
    depth = pd.read_csv(figures / "12_hit_rate_by_depth.csv")
    assert set(depth.model) == {"SmolLM2-135M-Instruct", SECOND_MODEL}
    assert depth.groupby("model").layers.first().to_dict() == {"SmolLM2-135M-Instruct": 30, SECOND_MODEL: 18}
    assert depth.depth.min() == 0 and depth.depth.max() == 1
    assert set(pd.read_csv(figures / "12_needle_by_model.csv").model) == {"SmolLM2-135M-Instruct", SECOND_MODEL}
    kernels = pd.read_csv(figures / "12_kernel_by_model.csv")
    assert list(dict.fromkeys(kernels.model)) == ["SmolLM2-135M-Instruct"]  # gemma's 10: full profile only
    assert kernels.budget.nunique() == 1 and set(kernels.experiment) == {"needle", "task suite"}
    across = (tmp_path / "12_across_models.html").read_text()
    assert "Holds on" in across or "Does not hold" in across  # the reading compares the two

    results = json.loads((tmp_path / "benchmarks" / "speed_memory.json").read_text())
    kv = {(row["method"], row["budget"], row["prompt_len"]): row["kv_cache_mib"] for row in results["rows"]}
    for n in (1024, 2048):
        assert kv[("SnapKV", 256, n)] < kv[("SnapKV", 512, n)] < kv[("FullCache", None, n)]
    assert kv[("SnapKV", 256, 1024)] == pytest.approx(kv[("SnapKV", 256, 2048)])  # does not grow with the prompt
