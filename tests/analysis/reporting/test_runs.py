"""The runs of a reports folder: the main pass and each models/NAME pass, and one CSV read from all of them."""

import json

from snapkv.analysis.reporting.runs import model_runs, read_across_models


def write_figure(folder, name, model_id, csv="a\n1\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.csv").write_text(csv)
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "environment": {"model_id": model_id}}))


def test_runs_are_labelled_by_their_model_and_missing_csvs_are_named(tmp_path):
    write_figure(tmp_path / "figures", "01_x", "Main-Model", "a\n1\n2\n")
    write_figure(tmp_path / "models" / "second" / "figures", "06_y", "Second-Model")
    runs = model_runs(tmp_path)
    assert [run.label for run in runs] == ["Main-Model", "Second-Model"]
    table, missing = read_across_models(tmp_path, "01_x")
    assert table.model.tolist() == ["Main-Model", "Main-Model"] and missing == ["Second-Model"]
    empty, missing = read_across_models(tmp_path, "07_z")
    assert empty.empty and missing == ["Main-Model", "Second-Model"]


def test_a_run_without_a_model_id_is_named_by_its_folder(tmp_path):
    (tmp_path / "models" / "gemma-3-270m" / "figures").mkdir(parents=True)
    assert [run.label for run in model_runs(tmp_path)] == ["default model", "gemma-3-270m"]


def test_the_embedded_models_come_by_size_and_any_other_model_after_them_by_name(tmp_path):
    for name in ("zz-local", "qwen2.5-coder-1.5b-instruct", "aa-local", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        (tmp_path / "models" / name / "figures").mkdir(parents=True)
    assert [run.label for run in model_runs(tmp_path)][1:] == [
        "gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "aa-local", "zz-local"]
