import json
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from snapkv import cli
from snapkv.analysis.reporting.notebooks import run_notebooks


def write_notebook(path, *sources):
    cells = [new_code_cell("profile = 'default'\nreports_dir = '.'", metadata={"tags": ["parameters"]})]
    cells += [new_code_cell(source) for source in sources]
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": kernelspec}), path)


RECORD_WHAT_THE_KERNEL_SEES = """
import json, sys
from pathlib import Path
figures = Path(reports_dir) / "figures"
figures.mkdir(parents=True, exist_ok=True)
seen = {"profile": profile, "python": sys.executable, "cwd": str(Path.cwd())}
(figures / "seen.json").write_text(json.dumps(seen))
"""
PASSING = (RECORD_WHAT_THE_KERNEL_SEES, "print('hello from the notebook')")


@pytest.fixture
def notebook_dir(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    return folder


def test_run_notebooks_executes_and_exports_html(notebook_dir, tmp_path):
    write_notebook(notebook_dir / "01_ok.ipynb", *PASSING)
    out = tmp_path / "reports"
    runs = run_notebooks(notebook_dir, out, profile="quick")
    assert runs.notebook.tolist() == ["01_ok.ipynb"] and runs.status.tolist() == ["ok"]
    assert "hello from the notebook" in (out / "01_ok.html").read_text()
    assert "hello from the notebook" in (out / "01_ok.ipynb").read_text()
    seen = json.loads((out / "figures" / "seen.json").read_text())
    assert seen == {"profile": "quick", "python": sys.executable, "cwd": str(notebook_dir)}  # this interpreter's kernel
    record = json.loads((out / "notebooks.json").read_text())
    assert record["parameters"]["profile"] == "quick" and record["notebooks"][0]["status"] == "ok"


def test_run_notebooks_fails_loudly_naming_the_failing_notebook(notebook_dir, tmp_path):
    write_notebook(notebook_dir / "01_ok.ipynb", *PASSING)
    write_notebook(notebook_dir / "02_broken.ipynb", "raise ValueError('boom in the notebook')")
    out = tmp_path / "reports"
    with pytest.raises(RuntimeError, match="02_broken.ipynb") as caught:
        run_notebooks(notebook_dir, out)
    assert "boom in the notebook" in str(caught.value) and "01_ok" not in str(caught.value)
    for name in ("01_ok", "02_broken"):  # what ran is written, the failure included
        assert (out / f"{name}.ipynb").is_file() and (out / f"{name}.html").is_file()
    assert "boom in the notebook" in (out / "02_broken.html").read_text()


def test_run_notebooks_rejects_a_folder_without_notebooks(tmp_path):
    with pytest.raises(ValueError, match="no \\*.ipynb"):
        run_notebooks(tmp_path, tmp_path / "reports")


def test_cli_reproduce_passes_parameters_and_reports_failure(notebook_dir, tmp_path, capsys):
    write_notebook(notebook_dir / "01_params.ipynb", "assert profile == 'quick' and steps == 3 and label == 'abc'")
    out = tmp_path / "reports"
    argv = ["reproduce", "--quick", "--notebooks", str(notebook_dir), "--out", str(out), "-p", "steps=3",
            "-p", "label=abc"]
    assert cli.main(argv) == 0
    assert (out / "01_params.html").is_file()

    assert cli.main(argv[:-2]) == 1  # label missing: the notebook fails
    assert "01_params.ipynb" in capsys.readouterr().err


def test_cli_parameter_values_are_literals_or_strings():
    assert cli._parameter("n=3") == ("n", 3)
    assert cli._parameter("flag=False") == ("flag", False)
    assert cli._parameter("name=SmolLM2") == ("name", "SmolLM2")
    with pytest.raises(Exception, match="NAME=VALUE"):
        cli._parameter("no-equals")


def test_cli_requires_a_command():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([])
    assert "reproduce" in cli.build_parser().format_help()


# -- `snapkv needle` / `snapkv tasks` read their profiles' values from the settings the notebooks use --


def needle_settings(*argv):
    from snapkv.analysis.quality.methods import NeedleSettings

    return cli._quality_settings(cli.build_parser().parse_args(["needle", *argv]), NeedleSettings)


def test_cli_quality_settings_come_from_the_shared_settings():
    from snapkv.analysis.quality.methods import NeedleSettings, TaskSettings
    from snapkv.analysis.reporting.setup import resolve_settings

    assert needle_settings("--full") == NeedleSettings()  # paper scale: the dataclass's own defaults
    assert needle_settings() == resolve_settings(NeedleSettings, "default") != NeedleSettings()
    assert needle_settings("--quick") == resolve_settings(NeedleSettings, "quick")
    with pytest.raises(SystemExit):  # one profile at a time
        cli.build_parser().parse_args(["needle", "--quick", "--full"])
    quick = needle_settings("--quick", "--lengths", "300,400", "--ablation-budgets", "", "--seed", "3")
    assert quick.lengths == (300, 400) and quick.ablation_budgets == () and quick.seed == 3  # given wins
    assert quick.budgets == NeedleSettings.QUICK["budgets"]
    args = cli.build_parser().parse_args(["tasks", "--quick", "--threshold", "0"])
    tasks = cli._quality_settings(args, TaskSettings, threshold=cli._given_one(args.threshold, float, "threshold"))
    assert tasks == resolve_settings(TaskSettings, "quick", threshold=0.0)


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--seed", "1,2"], "--seed expects one int"),
    (["--window-size", "0"], "--window-size must be >= 1"),
    (["--kernel-size", "0"], "--kernel-size must be >= 1"),
    (["--kernel-size", "4"], "positive odd int"),
    (["--samples", "x"], "--samples expects a comma-separated list of ints"),
])
def test_cli_quality_settings_reject_bad_ints(argv, message):
    with pytest.raises(ValueError, match=message):
        needle_settings(*argv)


def test_cli_prefill_chunk_defaults_and_must_hold_the_window():
    from snapkv.analysis.quality import DEFAULT_PREFILL_CHUNK

    args = cli.build_parser().parse_args(["needle"])
    assert cli._prefill_chunk(args, 16) == DEFAULT_PREFILL_CHUNK
    args = cli.build_parser().parse_args(["needle", "--prefill-chunk", "8"])
    with pytest.raises(ValueError, match="--prefill-chunk must be >= 16"):
        cli._prefill_chunk(args, 16)
