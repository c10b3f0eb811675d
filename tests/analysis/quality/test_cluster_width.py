"""The cluster-width sweep (snapkv.analysis.quality.cluster_width, notebook 10): its grid and checks, value
retention, the sweep on a tiny model (answers equal `evaluate`'s), the pooled hit rate (equal to notebook 01's
machinery at kernel 1), the summaries, readings and figures; a slow test of the finding on SmolLM2."""

import dataclasses

import pandas as pd
import pytest
import torch
from test_quality import HAYSTACK, TOKENIZER
from tiny_models import tiny_model

from snapkv import FullCache
from snapkv.analysis import quality
from snapkv.analysis.observation.attention import teacher_forced_attention
from snapkv.analysis.observation.metrics import hit_rate_table
from snapkv.analysis.quality import cluster_width as cw
from snapkv.analysis.quality import cluster_width_plots as cw_plots

TINY = cw.ClusterWidthSettings(kernel_sizes=(1, 31), budgets=(64,), window_size=8, other_window_sizes=(16,),
                               other_kernel_sizes=(5,), other_budgets=(64,), needle_lengths=(300,),
                               needle_depths=(0.0, 1.0), needle_samples=1, tasks=("single_key",), task_lengths=(300,),
                               task_samples=1, task_kernel_sizes=(1,), hit_rate_samples=2, hit_rate_context_tokens=None,
                               answer_tokens=12)


def test_sweep_grid_runs_every_kernel_and_budget_at_the_main_window_and_a_subset_elsewhere():
    settings = cw.ClusterWidthSettings()
    grid = cw.sweep_grid(settings)
    names = [(m.name, m.budget) for m in grid]
    assert len(names) == len(set(names)) and grid[0].name == "full" and isinstance(grid[0].policy, FullCache)
    main = [m for m in grid[1:] if m.policy.window_size == settings.window_size]
    assert {(m.policy.kernel_size, m.budget) for m in main} == {
        (k, b) for k in settings.kernel_sizes for b in settings.budgets}
    other = [m for m in grid[1:] if m.policy.window_size != settings.window_size]
    assert len(other) == len(settings.other_window_sizes) * len(settings.other_kernel_sizes) * len(
        settings.other_budgets)
    assert all(m.policy.pooling == "maxpool" and m.policy.gqa == "mean" for m in grid[1:])
    assert all(m.policy.max_capacity_prompt == m.budget for m in grid[1:])
    assert cw.method_name(16, 5) == "snapkv-w16-k5"
    tasks = cw.sweep_grid(settings, settings.task_kernel_sizes)
    assert {m.policy.kernel_size for m in tasks[1:] if m.policy.window_size == 16} == set(settings.task_kernel_sizes)


def test_every_profile_passes_the_checks():
    cw.check_settings(cw.ClusterWidthSettings())
    cw.check_settings(cw.ClusterWidthSettings(**cw.ClusterWidthSettings.DEFAULT))
    cw.check_settings(cw.ClusterWidthSettings(**cw.ClusterWidthSettings.QUICK))


@pytest.mark.parametrize("change, error, message", [
    (dict(kernel_sizes=(1, 4)), ValueError, "odd kernels"),
    (dict(kernel_sizes=()), ValueError, "kernel_sizes is empty"),
    (dict(task_kernel_sizes=(2.5,)), TypeError, "must be an int"),
    (dict(budgets=(16,)), ValueError, "must exceed the observation window"),
    (dict(other_budgets=(32,), other_window_sizes=(64,)), ValueError, "must exceed the observation window"),
    (dict(budgets=(128, 2000)), ValueError, "does not compress a 2000-token prompt"),
    (dict(gqa="sum"), ValueError, "gqa must be one of"),
    (dict(pooling="none"), ValueError, "maxpool or avgpool"),
    (dict(tasks=("code_completion",)), ValueError, "unscored task"),
    (dict(needle_format="uuid"), ValueError, "unknown needle_format"),
    (dict(answer_tokens=0), ValueError, "answer_tokens must be >= 1"),
])
def test_check_settings_names_the_problem(change, error, message):
    with pytest.raises(error, match=message):
        cw.check_settings(dataclasses.replace(cw.ClusterWidthSettings(), **change))


def test_value_retention_counts_the_pairs_that_keep_every_value_token():
    prompt = quality.needle_prompts(TOKENIZER, lengths=[300], depths=[0.5], haystack_text=HAYSTACK)[0]
    tokens = quality.needle_tokens(TOKENIZER, prompt)
    value = tokens.position[tokens.in_value].tolist()
    other = tokens.position.iloc[0]
    # layer 0: head 0 keeps the whole value, head 1 all but its last token; layer 1: head 0 the whole value
    # among other positions, head 1 none of it
    kept = {0: torch.tensor([[value + [0], value[:-1] + [other, 1]]]),
            1: torch.tensor([[[2] + value, list(range(len(value) + 1))]])}
    result = cw.value_retention(tokens, kept)
    assert result["value_tokens"] == len(value) == len(prompt.expected[0])  # one token per character here
    assert result["value_kept"] == 0.5  # 2 of the 4 (layer, head) pairs
    per_token = quality.needle_retention(tokens, kept)  # the needle-token figure's shares
    assert result["value_token_share"] == pytest.approx(per_token[per_token.in_value].kept_share.mean())
    assert cw.value_retention(tokens, {}) == dict(value_tokens=len(value), value_kept=1.0, value_token_share=1.0)
    with pytest.raises(ValueError, match="no value token"):
        cw.value_retention(tokens.assign(in_value=False), kept)


def test_voted_runs_counts_contiguous_clusters():
    voted = torch.tensor([[[1, 1, 0, 1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0, 0]]], dtype=torch.bool)
    assert cw.voted_runs(voted) == (6 + 4, 3 + 1)


@pytest.fixture(scope="module")
def tiny_sweep():
    model = tiny_model("llama")
    prompts = quality.needle_prompts(TOKENIZER, lengths=TINY.needle_lengths, depths=TINY.needle_depths,
                                     haystack_text=HAYSTACK)
    prompts = [dataclasses.replace(p, max_new_tokens=3) for p in prompts]  # a random model never stops early
    grid = cw.sweep_grid(TINY)
    return model, prompts, grid, cw.needle_sweep(model, TOKENIZER, prompts, grid, progress=False)


def test_needle_sweep_answers_equal_evaluate_and_carry_retention(tiny_sweep):
    model, prompts, grid, table = tiny_sweep
    assert len(table) == len(prompts) * len(grid)
    assert table.groupby(["depth", "method", "budget"], dropna=False).size().eq(1).all()
    evaluated = quality.evaluate(model, TOKENIZER, prompts, grid, progress=False)
    keys = ["depth", "method", "budget"]
    merged = table.merge(evaluated, on=keys, suffixes=("", "_evaluate"))
    assert len(merged) == len(table) and (merged.answer == merged.answer_evaluate).all()
    assert (merged.score == merged.score_evaluate).all()
    full = table[table.method == "full"]
    assert (full.value_kept == 1.0).all() and full.window_size.isna().all() and full.kernel_size.isna().all()
    snap = table[table.method != "full"]
    assert set(zip(snap.window_size, snap.kernel_size)) == {(8, 1), (8, 31), (16, 5)}
    assert (snap.value_kept <= snap.value_token_share + 1e-9).all()  # all tokens kept <= each token kept
    assert snap.value_token_share.between(0, 1).all() and (snap.value_tokens == 7).all()


def test_task_sweep_adds_window_and_kernel_columns():
    model = tiny_model("llama")
    prompts = quality.task_prompts(TOKENIZER, tasks=["single_key"], lengths=[300], samples=1, haystack_text=HAYSTACK)
    prompts = [dataclasses.replace(p, max_new_tokens=3) for p in prompts]
    grid = cw.sweep_grid(TINY, TINY.task_kernel_sizes)
    table = cw.task_sweep(model, TOKENIZER, prompts, grid, progress=False)
    assert set(zip(table.method, table.kernel_size.astype("float").fillna(-1))) == {
        ("full", -1), ("snapkv-w8-k1", 1), ("snapkv-w16-k5", 5)}


def chat_samples(n: int) -> list[dict]:
    words = HAYSTACK.split()
    return [dict(id=f"chat-{i}", module="textwrap", context=" ".join(words[40 * i : 40 * i + 50]),
                 response=" ".join(words[500 + 10 * i : 520 + 10 * i])) for i in range(n)]


def test_pooled_hit_rate_at_kernel_1_equals_notebook_01s_hit_rate():
    model = tiny_model("llama")
    settings = dataclasses.replace(TINY, gqa="expand")  # notebook 01: one voted set per query head
    samples = chat_samples(2)
    table = cw.pooled_hit_rate(model, TOKENIZER, samples, settings)
    assert set(zip(table.window_size, table.kernel_size)) == {(8, 1), (8, 31), (16, 5)}
    assert table.groupby(["sample", "window_size", "kernel_size"]).size().eq(3).all()  # 3 layers
    assert ((table.runs <= table.voted) & (table.runs > 0)).all() and table.hit_rate.dropna().between(0, 1).all()
    # kernel 1 at window 8: notebook 01's `hit_rate_table` on the same recording
    from snapkv.analysis.text import chat_ids, chat_request

    prompt = chat_ids(TOKENIZER, chat_request(samples[1], TOKENIZER))
    answer = TOKENIZER(samples[1]["response"]).input_ids[: settings.answer_tokens]
    observation, generated = teacher_forced_attention(model, torch.tensor([prompt + answer]), len(prompt), 16)
    reference = hit_rate_table({k: v[..., -8:, :] for k, v in observation.items()}, generated, window_size=8,
                               generation_window=settings.answer_tokens, references=())
    mine = table[(table["sample"] == 1) & (table.kernel_size == 1)].set_index("layer")
    for row in reference.itertuples():
        assert mine.loc[row.layer, "hits"] == row.hits and mine.loc[row.layer, "important"] == row.important
    with pytest.raises(ValueError, match="fewer than answer_tokens"):
        cw.pooled_hit_rate(model, TOKENIZER, samples, dataclasses.replace(TINY, answer_tokens=500))


def sweep_table(scores: dict, full: dict) -> pd.DataFrame:
    """A needle_sweep-like table: scores {(window, kernel, budget): [score per prompt]}, full [score per prompt]."""
    rows = [dict(task="needle", length=1000, depth=float(i), sample=0, mode="question-aware", method="full",
                 budget=pd.NA, window_size=pd.NA, kernel_size=pd.NA, score=s, value_kept=1.0, value_token_share=1.0)
            for i, s in enumerate(full)]
    for (window, kernel, budget), values in scores.items():
        rows += [dict(task="needle", length=1000, depth=float(i), sample=0, mode="question-aware",
                      method=cw.method_name(window, kernel), budget=budget, window_size=window, kernel_size=kernel,
                      score=s, value_kept=s / 2, value_token_share=0.5 + s / 4) for i, s in enumerate(values)]
    table = pd.DataFrame(rows)
    return table.astype({"budget": "Int64", "window_size": "Int64", "kernel_size": "Int64"})


def test_accuracy_by_kernel_reports_the_cells_the_full_cache_answers_separately():
    table = sweep_table({(16, 5, 128): [1, 0, 1, 0], (16, 15, 128): [1, 1, 1, 0]}, full=[1, 1, 0, 0])
    accuracy = cw.accuracy_by_kernel(table, "needle").set_index(["cells", "kernel_size"])
    assert accuracy.loc[(cw.ALL_PROMPTS, 5), "mean"] == 0.5 and accuracy.loc[(cw.ALL_PROMPTS, 15), "mean"] == 0.75
    assert accuracy.loc[(cw.ANSWERED, 5), "mean"] == 0.5 and accuracy.loc[(cw.ANSWERED, 15), "mean"] == 1.0
    assert accuracy.loc[(cw.ALL_PROMPTS, 5), "full_cache"] == 0.5 and accuracy.loc[(cw.ANSWERED, 5), "full_cache"] == 1
    assert (accuracy.samples == [4, 4, 2, 2]).all()
    retention = cw.value_retention_by_kernel(table).set_index(["measure", "kernel_size"])["mean"]
    assert retention[("every value token", 15)] == pytest.approx(0.375)
    assert retention[("mean value token", 5)] == pytest.approx(0.625)


def reading_inputs(accuracies: dict, full=(1, 1, 1, 1)):
    """(accuracy, retention) for `needle_width_reading` from {(kernel, budget): [score per prompt]} at window 16."""
    table = sweep_table({(16, k, b): s for (k, b), s in accuracies.items()}, full=list(full))
    return cw.accuracy_by_kernel(table, "needle"), cw.value_retention_by_kernel(table)


def test_needle_width_reading_finds_the_smallest_enough_kernel():
    accuracy, retention = reading_inputs({(5, 128): [1, 0, 0, 0], (15, 128): [1, 1, 1, 0], (31, 128): [1, 1, 1, 1],
                                          (63, 128): [1, 1, 0, 0], (5, 512): [1, 1, 0, 0], (15, 512): [1, 1, 1, 1],
                                          (31, 512): [1, 1, 1, 1], (63, 512): [1, 1, 1, 1]})
    needs = cw.needed_kernel(accuracy).set_index(["cells", "budget"])
    assert needs.loc[(cw.ANSWERED, 128), "needed"] == 31 and needs.loc[(cw.ANSWERED, 512), "needed"] == 15
    assert needs.loc[(cw.ANSWERED, 128), "paper"] == 0.25
    assert cw.needle_width(accuracy, 16) == 31  # 15 misses at 128; 63 is too wide there: the smallest enough is 31
    text = cw.needle_width_reading(accuracy, retention, value_tokens=7, window_size=16)
    assert "budget 128: kernel 5 0.25" in text and "smallest enough kernel 31 (1.00" in text
    assert "**Width the needle needs:** kernel 31" in text and "lifts 15 tokens" in text and "more than the 6" in text
    assert "at kernel 31 50% of the (layer, KV head) pairs keep the whole value" in text  # value_kept = score / 2
    assert "Wider is not always better: kernel 63 scores 0.50 at budget 128" in text
    lacking, retention = reading_inputs({(5, 128): [1, 0, 0, 0], (31, 128): [1, 1, 0, 0]})
    assert cw.needle_width(lacking, 16) is None
    text = cw.needle_width_reading(lacking, retention, value_tokens=7, window_size=16)
    assert "no kernel is enough (best: kernel 31, 0.50)" in text
    assert "**No kernel run is enough at every budget**" in text
    assert "No needle rows at window 32" in cw.needle_width_reading(lacking, retention, 7, window_size=32)


def hit_rate_summary(no_sinks: dict) -> pd.DataFrame:
    rows = [dict(measure=measure, window_size=16, kernel_size=k, mean=value, ci_low=value, ci_high=value, samples=3)
            for k, v in no_sinks.items()
            for measure, value in ((cw.HIT_RATE_MEASURES["hit_rate"], v + 0.05),
                                   (cw.HIT_RATE_MEASURES["hit_rate_no_sinks"], v),
                                   (cw.HIT_RATE_MEASURES["mass_recall"], v - 0.1),
                                   (cw.HIT_RATE_MEASURES["cluster_width"], float(k)))]
    return pd.DataFrame(rows)


def test_hit_rate_width_reading_says_whether_wide_kernels_stay_predictive():
    falling = cw.hit_rate_width_reading(hit_rate_summary({1: 0.9, 5: 0.8, 31: 0.4}), 16)
    assert "kernel 1 / 5 / 31: hit rate 0.95 / 0.85 / 0.45, without sinks 0.90 / 0.80 / 0.40" in falling
    assert "From kernel 1 to 31 the voted set buys contiguity with prediction" in falling and "falls by 0.50" in falling
    to_width = cw.hit_rate_width_reading(hit_rate_summary({1: 0.9, 5: 0.8, 21: 0.78, 63: 0.4}), 16, width=21)
    assert "kernel 1 / 5 / 21 / 63:" in to_width and "From kernel 5 to 21 the voted set stays predictive" in to_width
    steady = cw.hit_rate_width_reading(hit_rate_summary({1: 0.9, 31: 0.88}), 16, width=31)  # no kernel 5 run
    assert "From kernel 1 to 31 the voted set stays predictive" in steady and "1.0 / 31.0 tokens" in steady
    assert "No hit-rate rows at window 32" in cw.hit_rate_width_reading(hit_rate_summary({1: 0.9}), 32)


def test_figures_draw_every_budget_window_and_measure():
    table = sweep_table({(16, 5, 128): [1, 0], (16, 15, 128): [1, 1], (16, 5, 256): [1, 1], (32, 5, 256): [0, 1]},
                        full=[1, 0])
    accuracy = pd.concat([cw.accuracy_by_kernel(table, "needle"), cw.accuracy_by_kernel(table, "task suite")])
    figure, interactive = cw_plots.accuracy_by_kernel_figure(accuracy, "tiny")
    assert len(figure.axes) == 4  # needle and suite, all prompts and answered
    names = {t.name for t in interactive.data}
    assert names == {"full cache", "budget 128, window 16", "budget 256, window 16", "budget 256, window 32"}
    figure, interactive = cw_plots.value_retention_figure(cw.value_retention_by_kernel(table), "tiny")
    assert len(figure.axes) == 2 and len(interactive.data) == 2 * 3
    figure, interactive = cw_plots.hit_rate_by_kernel_figure(hit_rate_summary({1: 0.9, 31: 0.4}), "tiny")
    assert len(figure.axes) == 4 and {t.name for t in interactive.data} == {"window 16"}



def models_table(per_model: dict) -> pd.DataFrame:
    """Notebook 10's rows of several models, stacked with a `model` column: {model: (scores, full)} as in
    `sweep_table`, each for the needle and, with the same scores, the suite."""
    frames = [sweep_table(scores, full).assign(experiment=experiment, model=model)
              for model, (scores, full) in per_model.items() for experiment in ("needle", "task suite")]
    return pd.concat(frames, ignore_index=True)


def test_kernel_by_model_compares_the_shared_budget_at_each_models_main_window_in_table_order():
    table = models_table({
        "small": ({(16, 5, 128): [1, 0, 0, 0], (16, 31, 128): [1, 1, 1, 1], (16, 5, 512): [1, 1, 1, 1],
                   (32, 5, 128): [0, 0, 0, 0]}, [1, 1, 1, 1]),
        "large": ({(16, 5, 128): [1, 1, 1, 1], (16, 31, 128): [1, 1, 1, 0]}, [1, 1, 1, 0]),
    })
    accuracy = cw.accuracy_by_kernel_by_model(table)
    assert list(dict.fromkeys(accuracy.model)) == ["small", "large"]
    assert set(accuracy.budget) == {128} and set(accuracy.window_size) == {16}  # 512: small only; 32: one kernel
    answered = accuracy[accuracy.cells == cw.ANSWERED].set_index(["model", "experiment", "kernel_size"])["mean"]
    assert answered[("small", "needle", 5)] == 0.25 and answered[("large", "needle", 31)] == 1.0
    text = cw.kernel_by_model_reading(accuracy)
    assert "- small: needle kernel 5 0.25, kernel 31 1.00 (full cache 1.00, n = 4); enough from kernel 31" in text
    assert "- large: needle kernel 5 1.00, kernel 31 1.00 (full cache 1.00, n = 3); enough from kernel 5" in text
    assert "**Needle: differs between models:** the smallest kernel that is enough is small 31, large 5." in text
    same = cw.kernel_by_model_reading(cw.accuracy_by_kernel_by_model(models_table({
        "a": ({(16, 5, 128): [0, 0], (16, 31, 128): [1, 1]}, [1, 1]),
        "b": ({(16, 5, 128): [1, 0], (16, 31, 128): [1, 1]}, [1, 1])})))
    assert "**Task suite: the same at every size:** kernel 31 is the smallest that is enough on every model." in same
    figure, interactive = cw_plots.accuracy_by_kernel_by_model_figure(accuracy, "tiny")
    assert len(figure.axes) == 2 and [t.name for t in interactive.data][:2] == ["small", "large"]
    with pytest.raises(ValueError, match="no budget in common"):
        cw.accuracy_by_kernel_by_model(models_table({"a": ({(16, 5, 128): [1]}, [1]), "b": ({(16, 5, 256): [1]}, [1])}))

@pytest.mark.slow
def test_wide_kernels_keep_the_whole_value_in_more_heads_on_smollm(smollm):
    model, tokenizer = smollm
    prompts = quality.needle_prompts(tokenizer, lengths=[1000], depths=[0.5], seed=0)
    grid = [m for m in cw.sweep_grid(cw.ClusterWidthSettings(kernel_sizes=(1, 31), budgets=(128,),
                                                             other_window_sizes=()))]
    table = cw.needle_sweep(model, tokenizer, prompts, grid, progress=False).set_index("method")
    assert table.loc["full", "correct"]  # the 135M model answers this 1K needle uncompressed
    assert table.loc["snapkv-w16-k31", "value_kept"] > 2 * table.loc["snapkv-w16-k1", "value_kept"]
