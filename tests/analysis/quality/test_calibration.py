"""snapkv.calibrate (snapkv.analysis.quality.calibration): its prompts are never evaluation prompts, the ranking,
the choice, the cache (hit, corrupted file, other budget, force), input errors before any model work, the CLI; a
slow run on SmolLM2."""

import dataclasses
import json
import time

import pandas as pd
import pytest
from test_quality import TOKENIZER
from tiny_models import tiny_model

import snapkv
from snapkv import cli
from snapkv.analysis import quality
from snapkv.analysis.quality import calibration
from snapkv.analysis.quality.methods import NeedleSettings, TaskSettings
from snapkv.analysis.text import load_haystack, token_ids

TINY = calibration.CalibrationSettings(window_sizes=(8,), kernel_sizes=(1, 5), poolings=("maxpool",),
                                       gqa_modes=("mean", "max"), lengths=(400,), samples=2)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SNAPKV_CACHE", str(tmp_path))
    return tmp_path / "calibration"


def test_calibration_prompts_are_never_evaluation_prompts():
    lengths = (1000, 2000)  # lengths notebooks 06 and 07 both run
    prompts = calibration.calibration_prompts(TOKENIZER, lengths, samples=4)
    assert len(prompts) == 8 and all(p.prompt_tokens == p.length for p in prompts)
    needles = quality.needle_prompts(TOKENIZER, lengths=lengths, depths=NeedleSettings().depths)
    tasks = quality.task_prompts(TOKENIZER, tasks=[t for t in TaskSettings().tasks if t != "code_completion"],
                                 lengths=lengths, samples=TaskSettings().samples)
    evaluation = {tuple(p.ids) for p in needles + tasks}
    assert not evaluation & {tuple(p.ids) for p in prompts}
    evaluation_text = "\n".join(TOKENIZER.decode(p.ids) for p in needles + tasks)
    haystack = TOKENIZER.decode(token_ids(TOKENIZER, load_haystack()))  # the evaluation haystack, as tokenized
    for prompt in prompts:
        assert prompt.needle not in evaluation_text and prompt.expected[0] not in evaluation_text
        context = TOKENIZER.decode(prompt.context_ids)
        pieces = [context[i : i + 120] for i in range(0, len(context) - 120, 120)]
        assert not [p for p in pieces if p in haystack], "a calibration haystack passage is in the evaluation one"
    assert set(calibration.CALIBRATION_MODULES).isdisjoint(quality.prompts.MODULES)
    # the fact sits where the needle machinery looks for it; its value is a number of 6 to 9 digits
    for prompt in prompts:
        tokens = quality.needle_tokens(TOKENIZER, prompt)
        assert "".join(tokens.token[tokens.in_value]) == prompt.expected[0]
    assert all(p.expected[0].isdigit() and 6 <= len(p.expected[0]) <= 9 for p in prompts)
    assert [p.depth for p in prompts[:4]] == [0.125, 0.375, 0.625, 0.875]
    again = calibration.calibration_prompts(TOKENIZER, lengths, samples=4)
    with pytest.raises(ValueError, match="cannot hold its fact and question"):
        calibration.calibration_prompts(TOKENIZER, [150])
    assert [p.ids for p in again] == [p.ids for p in prompts]  # reproducible from its seed


def sweep_rows(scores: dict, full: list) -> tuple[pd.DataFrame, list]:
    """A needle_sweep-like table and its methods: scores {policy: [(score, prefix, value_kept) per prompt]}."""
    methods = calibration.candidates(calibration.CalibrationSettings(kernel_sizes=(5, 15), poolings=("maxpool",),
                                                                     window_sizes=(16,), gqa_modes=("mean",)), 128)
    rows = [dict(method="full", length=1000, sample=i, score=s, correct=s == 1, prefix_score=s, value_kept=1.0)
            for i, s in enumerate(full)]
    for method in methods[1:]:
        rows += [dict(method=method.name, length=1000, sample=i, score=s, correct=s == 1, prefix_score=p,
                      value_kept=v) for i, (s, p, v) in enumerate(scores[method.policy.kernel_size])]
    return pd.DataFrame(rows), methods


def test_candidates_are_the_registered_snapkv_method(monkeypatch):
    from snapkv.core import registry

    @dataclasses.dataclass(frozen=True)
    class TunedSnapKV(snapkv.SnapKV):
        pass

    monkeypatch.setitem(registry._METHODS, "snapkv", lambda budget, window_size, kernel_size: TunedSnapKV(
        window_size=window_size, max_capacity_prompt=budget, kernel_size=kernel_size))
    methods = calibration.candidates(TINY, 64)
    assert [type(m.policy) for m in methods[1:]] == [TunedSnapKV] * 4
    assert {(m.policy.kernel_size, m.policy.gqa) for m in methods[1:]} == {(1, "mean"), (1, "max"), (5, "mean"),
                                                                          (5, "max")}
    monkeypatch.setitem(registry._METHODS, "snapkv", lambda budget, window_size, kernel_size: snapkv.H2O())
    with pytest.raises(TypeError, match="register 'snapkv' as a SnapKV"):
        calibration.candidates(TINY, 64)


def test_candidate_table_ranks_on_what_the_full_cache_answers():
    # kernel 5 wins the prompt the full cache fails (it does not count); kernel 15 wins the answered ones
    sweep, methods = sweep_rows({5: [(1, 1, 0.2), (0, 0.5, 0.1), (1, 1, 0.9)], 15: [(1, 1, 0.6), (1, 1, 0.5),
                                                                                  (0, 0, 0.0)]}, full=[1, 1, 0])
    table, full_accuracy = calibration.candidate_table(sweep, methods)
    assert full_accuracy == pytest.approx(2 / 3)
    assert table.kernel_size.tolist() == [15, 5] and table.chosen.tolist() == [True, False]
    assert table.accuracy.tolist() == [1.0, 0.5] and table.prompts.tolist() == [2, 2]
    assert table["rank"].tolist() == [1, 2]
    # a tie on accuracy and prefix score is broken by how often the whole value is kept, then by the smaller kernel
    sweep, methods = sweep_rows({5: [(1, 1, 0.2)], 15: [(1, 1, 0.7)]}, full=[1])
    assert calibration.candidate_table(sweep, methods)[0].kernel_size.iloc[0] == 15
    sweep, methods = sweep_rows({5: [(1, 1, 0.5)], 15: [(1, 1, 0.5)]}, full=[1])
    assert calibration.candidate_table(sweep, methods)[0].kernel_size.iloc[0] == 5
    # an untrained model answers nothing: every prompt counts
    sweep, methods = sweep_rows({5: [(0, 0.2, 0.1), (0, 0.2, 0.1)], 15: [(0, 0.4, 0.1), (0, 0.0, 0.1)]}, full=[0, 0])
    table, full_accuracy = calibration.candidate_table(sweep, methods)
    assert full_accuracy == 0 and table.prompts.tolist() == [2, 2] and table.kernel_size.iloc[0] == 5
    policy = calibration.chosen_policy(table, 128)
    assert (policy.window_size, policy.kernel_size, policy.max_capacity_prompt) == (16, 5, 128)


def test_calibrate_chooses_the_top_candidate_and_caches_it(cache_dir, monkeypatch):
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="answers none"):  # a random model answers nothing
        result = snapkv.calibrate(model, TOKENIZER, budget=64, settings=TINY, progress=False)
    assert isinstance(result.policy, snapkv.SnapKV) and result.policy.max_capacity_prompt == 64
    assert len(result.table) == 4 and result.table.chosen.sum() == 1 and not result.cached
    best = result.table.iloc[0]
    assert best.chosen and (result.policy.window_size, result.policy.kernel_size, result.policy.pooling,
                            result.policy.gqa) == (best.window_size, best.kernel_size, best.pooling, best.gqa)
    ranked = result.table[list(calibration.RANKING)].apply(tuple, axis=1).tolist()
    assert ranked == sorted(ranked, reverse=True)
    assert result.prompts == 2 and result.lengths == (400,) and result.path.parent == cache_dir
    assert result.path.is_file()

    monkeypatch.setattr(calibration, "needle_sweep", lambda *a, **k: pytest.fail("calibrated again"))
    start = time.perf_counter()
    cached = snapkv.calibrate(model, TOKENIZER, budget=64, settings=TINY, progress=False)
    assert cached.cached and time.perf_counter() - start < 5
    assert cached.policy == result.policy and cached.path == result.path
    pd.testing.assert_frame_equal(cached.table, result.table, check_dtype=False)
    assert calibration.calibrated_policy(model, TOKENIZER, 64, settings=TINY) == result.policy
    methods = calibration.calibrated_methods(model, TOKENIZER, [64], settings=TINY)
    assert [(m.name, m.budget, m.policy) for m in methods] == [("snapkv-calibrated", 64, result.policy)]


def fake_sweep(runs: list):
    """A stand-in for `cluster_width.needle_sweep` (tested in test_cluster_width.py) that counts its calls: the
    full cache answers every prompt, candidates score by kernel so the widest wins."""
    def sweep(model, tokenizer, prompts, methods, **kwargs):
        runs.append(len(prompts))
        widest = max(m.policy.kernel_size for m in methods[1:])
        return pd.DataFrame([dict(method=m.name, length=p.length, sample=p.sample, correct=True, prefix_score=1.0,
                                  score=1.0 if m.name == "full" else m.policy.kernel_size / widest, value_kept=0.5)
                             for p in prompts for m in methods])
    return sweep


def test_calibration_cache_is_keyed_and_survives_a_corrupted_file(cache_dir, monkeypatch):
    model = tiny_model("llama")
    runs = []
    monkeypatch.setattr(calibration, "needle_sweep", fake_sweep(runs))
    monkeypatch.setattr(calibration.warnings, "warn", lambda *a, **k: None)
    first = calibration.calibrate(model, TOKENIZER, budget=64, settings=TINY, progress=False)
    first.path.write_text('{"key": "truncated')
    again = calibration.calibrate(model, TOKENIZER, budget=64, settings=TINY, progress=False)
    assert len(runs) == 2 and not again.cached and json.loads(again.path.read_text())["budget"] == 64
    record = json.loads(again.path.read_text())
    again.path.write_text(json.dumps(record | {"policy": {"window_size": 8, "max_capacity_prompt": 4}}))
    assert not calibration.calibrate(model, TOKENIZER, budget=64, settings=TINY, progress=False).cached
    assert len(runs) == 3
    other = calibration.calibrate(model, TOKENIZER, budget=96, settings=TINY, progress=False)
    assert other.path != first.path and other.policy.max_capacity_prompt == 96 and len(runs) == 4
    assert calibration.calibrate(model, TOKENIZER, budget=64, settings=TINY, progress=False).cached
    assert not calibration.calibrate(model, TOKENIZER, budget=64, settings=TINY, force=True, progress=False).cached
    wider = calibration.calibrate(model, TOKENIZER, budget=64, settings=TINY, kernel_sizes=(1, 5, 9), progress=False)
    assert wider.path != first.path and len(wider.table) == 6 and len(runs) == 6
    uncached = calibration.calibrate(tiny_model("llama", seed=1), TOKENIZER, budget=64, settings=TINY, cache=False,
                                     progress=False)
    assert uncached.path is None and len(runs) == 7 and len(list(cache_dir.glob("*.json"))) == 3


def test_model_fingerprint_follows_weights_not_names():
    model = tiny_model("llama")
    first = calibration.model_fingerprint(model, TOKENIZER)
    model.config.name_or_path = "somewhere/else"
    assert calibration.model_fingerprint(model, TOKENIZER) == first
    assert calibration.model_fingerprint(tiny_model("llama", seed=1), TOKENIZER) != first
    assert calibration.model_fingerprint(tiny_model("qwen3"), TOKENIZER) != first


@pytest.mark.parametrize("change, budget, error, message", [
    (dict(), 0, ValueError, "budget must be >= 1"),
    (dict(), 8, ValueError, "must exceed every candidate window"),
    (dict(kernel_sizes=(4,)), 64, ValueError, "kernel_sizes must be odd"),
    (dict(poolings=("none",)), 64, ValueError, "use maxpool and/or avgpool"),
    (dict(gqa_modes=("sum",)), 64, ValueError, "unknown gqa mode"),
    (dict(window_sizes=()), 64, ValueError, "window_sizes is empty"),
    (dict(lengths=(64,)), 64, ValueError, "does not exceed the budget"),
    (dict(lengths=(2000,)), 64, ValueError, "exceed the model's context"),
    (dict(samples=0), 64, ValueError, "samples must be >= 1"),
    (dict(), 1010, ValueError, "leaves no room"),
    (dict(), 64.0, TypeError, "budget must be an int"),
])
def test_calibrate_rejects_bad_input_before_any_model_work(change, budget, error, message, cache_dir, monkeypatch):
    monkeypatch.setattr(calibration, "needle_sweep", lambda *a, **k: pytest.fail("ran the model"))
    monkeypatch.setattr(calibration, "model_fingerprint", lambda *a, **k: pytest.fail("read the weights"))
    model = tiny_model("llama")  # 1024 positions
    settings = dataclasses.replace(TINY, lengths=None) if "lengths" not in change else TINY
    with pytest.raises(error, match=message):
        calibration.calibrate(model, TOKENIZER, budget=budget, settings=settings, **change)


def test_cli_calibrate_prints_the_choice_and_uses_the_cache(cache_dir, monkeypatch, capsys):
    model = tiny_model("llama")
    monkeypatch.setattr("snapkv.core.loading.load_model", lambda *a, **k: (model, TOKENIZER))
    monkeypatch.setattr(calibration, "needle_sweep", fake_sweep([]))
    argv = ["calibrate", "--budgets", "64,96", "--quick", "--window-sizes", "8", "--lengths", "400"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "budget 64: SnapKV(window_size=8, kernel_size=15, pooling='maxpool', gqa='mean')" in out  # QUICK kernels
    assert "budget 96:" in out and "calibrated in" in out
    assert len(list(cache_dir.glob("*.json"))) == 2
    assert cli.main(argv) == 0 and out.count("calibrated in") == 2
    assert capsys.readouterr().out.count("cached in") == 2
    monkeypatch.setattr("snapkv.core.loading.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for bad, message in ((["--budgets", "8"], "must exceed every candidate window"),
                         (["--budgets", "64", "--kernel-sizes", "4"], "must be odd"),
                         (["--budgets", "x"], "comma-separated list of ints")):
        assert cli.main(["calibrate", *bad]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_on_smollm_picks_the_wide_kernel(smollm, cache_dir):
    model, tokenizer = smollm
    settings = calibration.CalibrationSettings(window_sizes=(16,), kernel_sizes=(5, 31), poolings=("maxpool",),
                                               gqa_modes=("mean",), lengths=(1000,), samples=2)
    result = snapkv.calibrate(model, tokenizer, budget=128, settings=settings, progress=False)
    assert result.full_accuracy == 1.0  # the full cache answers both calibration prompts
    # notebook 10's finding: at budget 128 kernel 5 loses digits of the value where kernel 31 keeps it whole
    assert result.policy.kernel_size == 31 and result.table.set_index("kernel_size").value_kept[31] > \
        result.table.set_index("kernel_size").value_kept[5]
    assert snapkv.calibrate(model, tokenizer, budget=128, settings=settings).cached
    evaluation = quality.needle_prompts(tokenizer, lengths=[1000]) + quality.task_prompts(
        tokenizer, tasks=["single_key", "multi_key"], lengths=[1000])
    mine = calibration.calibration_prompts(tokenizer, [1000], samples=2)
    assert not {tuple(p.ids) for p in evaluation} & {tuple(p.ids) for p in mine}
