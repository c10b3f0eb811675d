"""Long-context quality machinery (snapkv.analysis.quality): prompt generators, scoring, the shared prefill
(equal to one `generate` per method), question-agnostic compression, CLI errors; slow tests on the real model."""

import dataclasses
import json

import pandas as pd
import pytest
import torch
from tiny_models import FAMILIES, AsciiTokenizer, PlainAsciiTokenizer, tiny_model, tiny_tokenizer
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import snapkv
from snapkv import cli
from snapkv.analysis import quality, text
from snapkv.analysis.quality import plots as quality_plots
from snapkv.analysis.quality import runner

TOKENIZER = AsciiTokenizer()
HAYSTACK = text.stdlib_haystack_text(["textwrap", "csv", "json"])


# -- generators -----------------------------------------------------------------------------------------------


def test_a_tokenizer_without_chat_template_gets_plain_question_answer_prompts():
    plain = PlainAsciiTokenizer()
    assert text.chat_parts(plain) == ([1], "\nAnswer:")
    needle = quality.needle_prompts(plain, lengths=[300], depths=[0.5], haystack_text=HAYSTACK)[0]
    assert needle.prompt_tokens == 300 and needle.context_ids[0] == 1 and 1 not in needle.ids[1:]
    assert plain.decode(needle.tail_ids) == f"\n\nQuestion: {needle.question}\nAnswer: The special magic number " \
        f"for {needle.needle.split()[5]} mentioned in the provided text is"
    assert (quality.needle_tokens(plain, needle).position >= 1).all()
    for prompt in quality.task_prompts(plain, lengths=[400], samples=1, haystack_text=HAYSTACK):
        tail = plain.decode(prompt.tail_ids)
        assert prompt.context_ids[0] == 1 and tail.startswith("\n\nQuestion: ") and "\nAnswer:" in tail
        assert prompt.prompt_tokens == 400 or prompt.task == "code_completion"
    chat = quality.needle_prompts(TOKENIZER, lengths=[300], depths=[0.5], haystack_text=HAYSTACK)[0]
    assert TOKENIZER.decode(chat.tail_ids).startswith(f"\n\n{chat.question}</u>\n<a>The special")


def test_needle_starts_exactly_at_its_depth():
    depths = [0.0, 0.1, 0.35, 0.5, 1.0]
    prompts = quality.needle_prompts(TOKENIZER, lengths=[400, 700], depths=depths, samples=2,
                                     haystack_text=HAYSTACK)
    assert len(prompts) == 2 * 2 * len(depths)
    head = len(text.chat_parts(TOKENIZER)[0])
    for p in prompts:
        assert p.prompt_tokens == p.length
        needle = TOKENIZER(f"\n{p.needle}\n").input_ids
        assert p.ids[p.needle_position : p.needle_position + len(needle)] == needle
        filler = len(p.context_ids) - head - len(needle)
        assert p.needle_position - head == round(p.depth * filler)
        assert p.expected[0] in p.needle and p.expected[0] not in TOKENIZER.decode(p.tail_ids)
    first = [p for p in prompts if p.length == 400 and p.sample == 0]
    assert first[0].needle_position == head  # depth 0: the first context token
    assert first[-1].needle_position + len(TOKENIZER(f"\n{first[-1].needle}\n").input_ids) == len(first[-1].context_ids)
    assert len({p.expected for p in first}) == 1  # one needle per sample, at every depth


def test_generators_are_deterministic_with_seed():
    def build(seed):
        return (quality.needle_prompts(TOKENIZER, lengths=[500], depths=[0.3], samples=3, seed=seed,
                                       haystack_text=HAYSTACK)
                + quality.task_prompts(TOKENIZER, lengths=[600], samples=2, seed=seed, haystack_text=HAYSTACK))
    first, again, other = build(0), build(0), build(1)
    assert first == again
    assert [p.ids for p in first] != [p.ids for p in other]
    assert len({p.expected for p in first if p.task == "needle"}) == 3  # samples differ


def test_task_prompts_hold_their_facts():
    prompts = quality.task_prompts(TOKENIZER, lengths=[600], samples=3, haystack_text=HAYSTACK)
    assert sorted({p.task for p in prompts}) == sorted(quality.TASKS)
    for p in prompts:
        context = TOKENIZER.decode(p.context_ids)
        assert p.prompt_tokens <= p.length
        if p.task == "code_completion":
            assert p.scoring == "edit_similarity" and quality.prompts._good_target_line(p.expected[0])
            assert context.endswith("\n") and p.expected[0] not in context[-200:].splitlines()[-1:]
            continue
        assert p.prompt_tokens == p.length
        for value in p.expected:
            assert value in context
        if p.task == "multi_key":
            assert context.count("The value of key") == 4 and len(p.expected) == 1
        if p.task == "multi_value":
            assert len(p.expected) == 4 and all(f"is {v}." in context for v in p.expected)
        if p.task == "variable_tracking":  # the chain appears in order
            positions = [context.index(f"VAR {name} =") for name in p.expected]
            assert positions == sorted(positions)


def test_fill_places_several_inserts_in_depth_order():
    import random
    haystack = list(range(1000, 2000))
    inserts = [(0.8, [1, 2]), (0.2, [3]), (0.2, [4, 5])]
    ids, starts = quality.prompts.fill_haystack(haystack, inserts, 50, random.Random(0))
    assert len(ids) == 50 and ids[starts[0] : starts[0] + 2] == [1, 2] and ids[starts[1]] == 3
    assert starts[1] < starts[2] < starts[0]
    with pytest.raises(ValueError, match="haystack has"):
        quality.prompts.fill_haystack(haystack[:10], [(0.5, [1])], 50, random.Random(0))


# -- scoring --------------------------------------------------------------------------------------------------


def test_scoring_functions():
    assert quality.contains_score(" 482193.", ["482193"]) == 1.0
    assert quality.contains_score("4821930", ["482193"]) == 0.0  # a longer number is not the value
    assert quality.contains_score("AAA, bbb and CCC", ["aaa", "BBB", "ddd", "ccc"]) == 0.75
    assert quality.first_code_line("```python\n\n    x = f(y)\nmore") == "x = f(y)"
    assert quality.edit_similarity("```\n    return x + 1\n```", "return x + 1") == 1.0
    assert 0 < quality.edit_similarity("return x + 2", "return x + 1") < 1
    assert quality.edit_similarity("", "return x") == 0.0
    code = quality.QualityPrompt("code_completion", 10, 0, (1,), (2, 3), ("y = 2",), "edit_similarity", 4, "q")
    assert quality.score_answer(code, "y = 2\n") == (1.0, True)
    assert quality.score_answer(code, "y = 3")[1] is False
    with pytest.raises(ValueError):
        quality.contains_score("x", [])
    assert quality.prefix_score(" 344.", "3440437") == pytest.approx(3 / 7)
    assert quality.prefix_score("`3440437`", "3440437") == 1.0 and quality.prefix_score("no", "3440437") == 0.0


# -- methods and errors ---------------------------------------------------------------------------------------


def test_method_grid_and_input_errors():
    grid = quality.method_grid(["full", "snapkv", "snapkv-nopool"], [256, 128], [128])
    assert [m.key for m in grid] == [("full", None), ("snapkv", 128), ("snapkv", 256), ("snapkv-nopool", 128)]
    assert grid[1].policy == snapkv.SnapKV(window_size=16, max_capacity_prompt=128, kernel_size=5, pooling="maxpool")
    assert grid[3].policy.pooling == "none"
    with pytest.raises(ValueError, match="unknown method"):
        quality.method_grid(["snapkv", "pyramid"], [128])
    with pytest.raises(ValueError, match="must exceed the observation window"):
        quality.method_grid(["snapkv"], [16])
    with pytest.raises(ValueError, match="samples must be >= 1"):
        quality.needle_prompts(TOKENIZER, lengths=[300], samples=0, haystack_text=HAYSTACK)
    with pytest.raises(ValueError, match="exceed the model's context"):
        quality.check_lengths_fit([1000], tiny_model(), 40)


# -- shared prefill equals one run per method -----------------------------------------------------------------


def _reference_aware(model, ids, policy, steps):
    with snapkv.compress(model, policy):
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.logits, 1)[0]


def _reference_agnostic(model, context, tail, policy, steps):
    """The question-agnostic recipe written with the public API only."""
    with torch.no_grad(), snapkv.compress(model, policy) as session:
        cache = model(context, use_cache=True).past_key_values
        session.compress_before_next_forward()
        logits = model(tail, past_key_values=cache).logits[:, -1]
        tokens, rows = [], []
        for step in range(steps):
            rows.append(logits[0])
            tokens.append(int(logits.argmax()))
            if step < steps - 1:
                logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache).logits[:, -1]
    return tokens, torch.stack(rows), dict(session.kept_positions)


POLICY_GRID = quality.method_grid(quality.METHODS, (24,), (24,), window_size=8, kernel_size=3,
                                  tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefill_equals_one_run_per_method(family):
    model = tiny_model(family)
    ids = torch.randint(3, 120, (1, 90), generator=torch.Generator().manual_seed(1))
    context, tail = ids[:, :80], ids[:, 80:]
    answers = quality.answers_with_shared_prefill(model, context[0], tail[0], POLICY_GRID, modes=quality.MODES,
                                                  max_new_tokens=5, keep_logits=True, prefill_chunk_size=None)
    assert len(answers) == 2 * len(POLICY_GRID)
    for method in POLICY_GRID:
        aware = answers[("question-aware", method.name, method.budget)]
        tokens, logits = _reference_aware(model, ids, method.policy, 5)
        assert aware.tokens == tokens, method
        assert torch.allclose(aware.logits, logits, atol=1e-5, rtol=0), method
        # PyramidKV's layer budgets average to the budget up to its integer steps
        assert aware.cache_slots == pytest.approx(90 if method.budget is None else method.budget, abs=1)
        agnostic = answers[("question-agnostic", method.name, method.budget)]
        tokens, logits, _ = _reference_agnostic(model, context, tail, method.policy, 5)
        assert agnostic.tokens == tokens, method
        assert torch.allclose(agnostic.logits, logits, atol=1e-5, rtol=0), method


@pytest.mark.parametrize("context_length, length, chunk", [
    (90, 100, 32),
    (33, 50, 16),  # context and tail (17 tokens) both end on a 1-token chunk: no longer taken for a decoding step
])
def test_chunked_shared_prefill_matches_single_forward(context_length, length, chunk):
    model = tiny_model("llama")
    ids = torch.randint(3, 120, (1, length), generator=torch.Generator().manual_seed(2))
    grid = [m for m in POLICY_GRID if m.name in ("full", "snapkv", "h2o")]
    context, tail = ids[0, :context_length], ids[0, context_length:]
    whole = quality.answers_with_shared_prefill(model, context, tail, grid, modes=quality.MODES,
                                                max_new_tokens=4, keep_logits=True, prefill_chunk_size=None)
    chunked = quality.answers_with_shared_prefill(model, context, tail, grid, modes=quality.MODES,
                                                  max_new_tokens=4, keep_logits=True, prefill_chunk_size=chunk)
    for key, answer in whole.items():
        assert answer.tokens == chunked[key].tokens, key
        assert torch.allclose(answer.logits, chunked[key].logits, atol=1e-4, rtol=0), key


VISIBLE: dict[int, torch.Tensor] = {}
CONTEXT_LEN = [0]


def _agnostic_reference_attention(module, query, key, value, attention_mask, **kwargs):
    """One forward of the whole sequence in which every query after the context sees only the kept context
    positions of its head (and, causally, everything after the context)."""
    visible = VISIBLE.get(module.layer_idx)
    if visible is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    n, total = CONTEXT_LEN[0], key.shape[-2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
    allowed = torch.ones(total, total, dtype=torch.bool).tril()[None, None].repeat(1, query.shape[1], 1, 1)
    allowed[:, :, n:, :n] = visible[:, :, None, :]
    logits = (query.float() @ key.transpose(2, 3)) * kwargs["scaling"]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ value).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("agnostic_reference", _agnostic_reference_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("agnostic_reference", sdpa_mask)


@pytest.mark.parametrize("method", [m for m in POLICY_GRID if m.name in ("snapkv", "h2o", "random")],
                         ids=lambda m: f"{m.name}-{m.budget}")
def test_question_agnostic_equals_masked_full_attention(method):
    """Question-agnostic decoding (question fed in one forward after compression) equals a full-cache
    forward of the whole sequence in which the question and answer tokens cannot see evicted context."""
    model = tiny_model("llama")
    ids = torch.randint(3, 120, (1, 90), generator=torch.Generator().manual_seed(3))
    context, tail = ids[:, :80], ids[:, 80:]
    tokens, logits, kept = _reference_agnostic(model, context, tail, method.policy, 5)
    answers = quality.answers_with_shared_prefill(model, context[0], tail[0], [method], modes=["question-agnostic"],
                                                  max_new_tokens=5, keep_logits=True, prefill_chunk_size=None)
    assert answers[("question-agnostic", method.name, method.budget)].tokens == tokens
    heads = model.config.num_attention_heads
    VISIBLE.clear()
    for layer, positions in kept.items():
        visible = torch.zeros(1, positions.shape[1], 80, dtype=torch.bool).scatter_(2, positions, True)
        VISIBLE[layer] = visible.repeat_interleave(heads // positions.shape[1], dim=1)
    CONTEXT_LEN[0] = 80
    model.set_attn_implementation("agnostic_reference")
    try:
        with torch.no_grad():
            full = model(torch.cat([ids, torch.tensor([tokens[:-1]])], 1)).logits[0, 89:]
    finally:
        model.set_attn_implementation("sdpa")
        VISIBLE.clear()
    assert torch.allclose(full, logits, atol=1e-4, rtol=0)


# -- experiment tables, calibration, figures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_table():
    model = tiny_model("llama")
    prompts = quality.needle_prompts(TOKENIZER, lengths=[300, 400], depths=[0.0, 1.0], haystack_text=HAYSTACK)
    prompts += quality.task_prompts(TOKENIZER, tasks=["single_key", "code_completion"], lengths=[300], samples=1,
                                    haystack_text=HAYSTACK)
    prompts = [dataclasses.replace(p, max_new_tokens=3) for p in prompts]  # a random model never stops early
    grid = quality.method_grid(["full", "snapkv", "streaming", "snapkv-avgpool"], [64, 320], [64])
    return quality.evaluate(model, TOKENIZER, prompts, grid, modes=quality.MODES, progress=False)


def test_evaluate_table_is_tidy_and_skips_budgets_covering_the_prompt(tiny_table):
    table = tiny_table
    columns = {"task", "length", "depth", "sample", "mode", "method", "budget", "score", "correct", "answer"}
    assert columns <= set(table.columns)
    assert not ((table.budget >= table.prompt_tokens) & table.budget.notna()).any()
    needle = table[table.task == "needle"]
    assert set(needle[needle.length == 400].budget.dropna()) == {64, 320}
    per_prompt = needle.groupby(["length", "depth", "mode"]).size()
    assert per_prompt.tolist() == [4] * 4 + [6] * 4  # 300: full, snapkv, streaming, avgpool at 64; 400: + 320 x2
    assert table.score.between(0, 1).all() and (table.cache_slots <= table.prompt_tokens).all()
    retention = quality.retention_table(table, ["mode", "method", "budget"])
    assert {"retention", "ci_low", "ci_high"} <= set(retention.columns)


def test_calibrate_drops_groups_the_full_cache_fails():
    rows = [dict(task=t, length=n, method="full", mode="question-aware", score=s)
            for t, n, s in [("a", 1, 1.0), ("a", 1, 0.0), ("a", 2, 0.0), ("b", 1, 1.0)]]
    calibration = quality.calibrate(pd.DataFrame(rows), threshold=0.5)
    assert calibration.kept.tolist() == [True, False, True]
    assert "dropped" in calibration.reason[1] and calibration.full_score.tolist() == [0.5, 0.0, 1.0]


def test_calibrated_evaluate_drops_groups_the_full_cache_fails(monkeypatch):
    model = tiny_model("llama")
    prompts = quality.task_prompts(TOKENIZER, tasks=["single_key", "code_completion"], lengths=[300], samples=3,
                                   haystack_text=HAYSTACK)
    prompts = [dataclasses.replace(p, max_new_tokens=3) for p in prompts]
    grid = quality.method_grid(["full", "snapkv"], [64], [])
    # a random model never finds the value; its code lines are scored as similar as any string is
    table, calibration = quality.calibrated_evaluate(model, TOKENIZER, prompts, grid, threshold=0.01,
                                                     calibration_samples=2, progress=False)
    single = calibration.set_index("task").loc["single_key"]
    assert not single.kept and single.samples == 2 and "dropped" in single.reason
    assert set(table.task) <= {"code_completion"}
    if calibration.set_index("task").loc["code_completion"].kept:
        assert sorted(table["sample"].unique()) == [0, 1, 2] and set(table.method) == {"full", "snapkv"}


def test_figures_and_targets_from_the_table(tiny_table):
    table = tiny_table
    fig, interactive = quality_plots.needle_heatmap_figure(table, "tiny")
    assert len(interactive.data) == 6 and len(fig.axes) >= 6  # full, snapkv x2, streaming x2, avgpool
    tasks = table[table.task != "needle"]
    summary = quality.summarize_quality(tasks)
    retention = quality.retention_table(tasks, ["mode", "task", "method", "budget"])
    fig, interactive = quality_plots.accuracy_vs_budget_figure(summary, retention, "tiny")
    lines = [t for t in interactive.data if t.customdata is not None]
    assert lines and all(list(t.customdata) == [64] for t in lines)  # hover: the budget; x: drawn beside it
    hovers = {t.showlegend: t.hovertemplate for t in lines}  # the score row shows the legend; retention does not
    assert "<br>score %{y" in hovers[True] and "<br>retention %{y" in hovers[False]
    assert len({t.x[0] for t in lines if t.showlegend}) == len([t for t in lines if t.showlegend]) > 1
    legend = [t.name.split(" (")[0] for t in lines if t.showlegend]
    assert legend == sorted(legend, key=quality_plots.METHOD_ORDER.index)
    ablation = table[(table.task == "needle") & table.method.str.startswith("snapkv") & (table.budget == 64)]
    summary = quality.summarize_quality(ablation.assign(pooling=ablation.method), ["pooling", "length"])
    fig, interactive = quality_plots.pooling_ablation_figure(summary, "tiny")
    assert {t.name for t in interactive.data} == {"snapkv", "snapkv-avgpool"}
    fig, interactive = quality_plots.calibration_figure(quality.calibrate(tasks), "tiny", 0.5)
    checks = quality.target_checks(table[table.task == "needle"], tasks, retention_budget=320, compare_budgets=(64,))
    assert list(checks.columns) == ["target", "measured", "met"] and len(checks) == 3  # no "random" in the grid


def test_needle_tokens_mark_the_value_and_retention_counts_kept_heads():
    prompt = quality.needle_prompts(TOKENIZER, lengths=[300], depths=[0.5], haystack_text=HAYSTACK)[0]
    tokens = quality.needle_tokens(TOKENIZER, prompt)
    assert "".join(tokens.token) == f"\n{prompt.needle}\n"  # one token per character here
    assert "".join(tokens.token[tokens.in_value]) == prompt.expected[0]
    assert (tokens.position == prompt.needle_position + tokens["index"]).all()
    value = tokens.position[tokens.in_value].tolist()
    # layer 0: both heads keep the value's first token; layer 1: one head keeps all of the value
    kept = {0: torch.tensor([[[0, value[0]], [value[0], 5]]]), 1: torch.tensor([[value, list(range(len(value)))]])}
    shares = quality.needle_retention(tokens, kept).set_index("position").kept_share
    assert shares[value[0]] == 0.75 and shares[value[1]] == 0.25 and shares[tokens.position.iloc[0]] == 0.0
    assert (quality.needle_retention(tokens, kept).compressed_layers == 2).all()  # the share is over 2 layers
    assert (quality.needle_retention(tokens, {}).kept_share == 1.0).all()  # the full cache evicts nothing
    assert (quality.needle_retention(tokens, {}).compressed_layers == 0).all()
    task = quality.task_prompts(TOKENIZER, tasks=["single_key"], lengths=[300], samples=1, haystack_text=HAYSTACK)[0]
    with pytest.raises(ValueError, match="has no needle"):
        quality.needle_tokens(TOKENIZER, task)
    with pytest.raises(ValueError, match="at least one needle prompt"):
        quality.needle_retention_experiment(None, TOKENIZER, [], quality.method_grid(["full"], [], []))


def test_needle_retention_experiment_matches_the_evaluated_answers(tiny_table):
    model = tiny_model("llama")
    prompts = quality.needle_prompts(TOKENIZER, lengths=[400], depths=[0.0], haystack_text=HAYSTACK)
    prompts = [dataclasses.replace(p, max_new_tokens=3) for p in prompts]
    grid = quality.method_grid(["full", "snapkv"], [64], [])
    table = quality.needle_retention_experiment(model, TOKENIZER, prompts, grid)
    answers = table.drop_duplicates(["method", "budget"]).set_index("method").answer
    same = tiny_table[(tiny_table.length == 400) & (tiny_table.depth == 0.0) & (tiny_table["mode"] == "question-aware")]
    evaluated = same[same.budget.isna() | (same.budget == 64)].set_index("method").answer
    assert answers["full"] == evaluated["full"] and answers["snapkv"] == evaluated["snapkv"]
    snap = table[table.method == "snapkv"]
    assert (table[table.method == "full"].kept_share == 1.0).all() and snap.kept_share.between(0, 1).all()
    assert snap.kept_share.min() < 1.0  # 64 of 400 positions kept: some needle token is gone from some head
    fig, interactive = quality_plots.needle_tokens_figure(table, "tiny")
    assert {t.name for t in interactive.data} == {"full cache", "snapkv @ 64"}


# -- CLI ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["needle", "--methods", "snapkv,pyramid"], "unknown method"),
    (["needle", "--budgets", "8"], "must exceed the observation window"),
    (["tasks", "--samples", "0"], "samples must be >= 1"),
    (["needle", "--lengths", "0"], "lengths must be >= 1"),
    (["tasks", "--tasks", "summaries"], "unknown task"),
    (["needle", "--modes", "sideways"], "unknown mode"),
    (["needle", "--device", "tpu"], "not a torch device"),
    (["tasks", "--dtype", "int8"], "not a floating dtype"),
    (["needle", "--kernel-size", "4"], "positive odd int"),
    (["tasks", "--window-size", "64", "--budgets", "64"], "must exceed the observation window"),
])
def test_cli_rejects_bad_input_before_loading_a_model(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("snapkv.core.loading.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert cli.main(argv) == 1
    assert message in capsys.readouterr().err


def test_cli_rejects_a_length_beyond_the_model_before_any_prefill(capsys, monkeypatch, tmp_path):
    model = tiny_model("llama")  # 1024 positions
    monkeypatch.setattr("snapkv.core.loading.load_model", lambda *a, **k: (model, TOKENIZER))
    monkeypatch.setattr(quality, "answers_with_shared_prefill", lambda *a, **k: pytest.fail("ran a prefill"))
    assert cli.main(["needle", "--lengths", "2000", "--out", str(tmp_path)]) == 1
    assert "exceed the model's context (1024 positions)" in capsys.readouterr().err


def test_cli_needle_and_tasks_write_their_outputs(tmp_path, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr("snapkv.core.loading.load_model", lambda *a, **k: (model, TOKENIZER))
    haystack = tmp_path / "haystack.txt"
    haystack.write_text(HAYSTACK)
    grids = []
    real_grid = quality.method_grid
    monkeypatch.setattr(quality, "method_grid", lambda *a, **k: grids.append(real_grid(*a, **k)) or grids[-1])
    out = tmp_path / "needle"
    assert cli.main(["needle", "--lengths", "300", "--depths", "0,1", "--samples", "1", "--methods", "full,snapkv",
                     "--budgets", "64", "--haystack", str(haystack), "--out", str(out), "--window-size", "24",
                     "--kernel-size", "3"]) == 0
    snap = grids[-1][-1].policy
    assert (snap.window_size, snap.kernel_size) == (24, 3)
    for kind in ("png", "html", "csv", "json"):
        assert (out / f"needle.{kind}").stat().st_size > 0
    settings = json.loads((out / "needle.json").read_text())["settings"]
    assert settings["lengths"] == [300] and settings["methods"] == ["full", "snapkv"] and settings["window_size"] == 24
    assert len(pd.read_csv(out / "needle.csv")) == 2 * 2
    out = tmp_path / "tasks"
    assert cli.main(["tasks", "--tasks", "single_key", "--lengths", "300", "--samples", "1",
                     "--methods", "full,snapkv,streaming", "--budgets", "64", "--threshold", "0",
                     "--haystack", str(haystack), "--out", str(out)]) == 0
    for name in ("tasks", "tasks_calibration"):
        for kind in ("png", "html", "csv", "json"):
            assert (out / f"{name}.{kind}").stat().st_size > 0, name


# -- the real model -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_cache_finds_a_needle_and_a_key_in_1k_tokens(smollm):
    model, tokenizer = smollm
    prompts = quality.needle_prompts(tokenizer, lengths=[1000], depths=[0.5], samples=1)
    prompts += quality.task_prompts(tokenizer, tasks=["single_key"], lengths=[1000], samples=1)
    table = quality.evaluate(model, tokenizer, prompts, quality.method_grid(["full"], [], ()), progress=False)
    assert table.correct.all(), table[["task", "answer", "expected"]]


@pytest.mark.slow
def test_cli_quick_run_writes_its_outputs(tmp_path, capsys):
    assert cli.main(["needle", "--quick", "--out", str(tmp_path)]) == 0
    for kind in ("png", "html", "csv", "json"):
        assert (tmp_path / f"needle.{kind}").stat().st_size > 0
    table = pd.read_csv(tmp_path / "needle.csv")
    quick = quality.NeedleSettings.QUICK["methods"]  # quick mode = notebook 06's
    assert set(table.method) == set(quick) >= {"full", "snapkv", "adakv", "pyramidkv", "chunkkv", "snapkv-avgpool"}
    assert "mean score" in capsys.readouterr().out


def test_successor_checks_read_only_the_prompts_the_full_cache_answers():
    def needle(method, budget, scores):
        return [dict(task="needle", length=1000, depth=float(d), sample=0, mode="question-aware", method=method,
                     budget=budget, score=s) for d, s in enumerate(scores)]

    rows = (needle("full", None, [1, 1, 1, 0]) + needle("snapkv-calibrated", 512, [1, 1, 0, 1])
            + needle("snapkv-calibrated", 256, [1, 1, 1, 0]) + needle("chunkkv", 512, [1, 1, 1, 0]))
    suite = [dict(task=t, mode="question-aware", method=m, budget=b, score=s)
             for t, m, b, s in [("a", "streaming", 128, 0.5), ("b", "streaming", 128, 0.5),
                                ("a", "streaming", 256, 0.5), ("b", "streaming", 256, 0.7),
                                ("a", "snapkv", 128, 0.5), ("b", "snapkv", 128, 0.6),
                                ("a", "snapkv", 256, 0.6), ("b", "snapkv", 256, 0.6), ("a", "adakv", 128, 1.0),
                                ("b", "adakv", 128, 1.0), ("a", "adakv", 256, 0.5), ("b", "adakv", 256, 0.6)]]
    checks = quality.successor_checks(pd.DataFrame(rows), pd.DataFrame(suite)).set_index("target")
    calibrated_512 = checks.loc["needle: snapkv-calibrated @ 512 keeps >= 90% of the full cache's accuracy"]
    assert not calibrated_512.met and calibrated_512.measured.startswith("0.667 on the 3 prompts")  # not 3 of 4
    assert checks.loc["needle: snapkv-calibrated @ 256 keeps >= 80% of the full cache's accuracy"].met
    best = checks.loc["needle: the best policy @ 512 keeps >= 95%"]
    assert best.met and best.measured.startswith("chunkkv 1.000")
    assert checks.loc["suite mean: snapkv >= streaming at every budget"].met
    adakv = checks.loc["suite mean: adakv >= streaming at every budget"]
    assert not adakv.met and adakv.measured == "below at 256 (0.550 vs 0.600)"


def test_evaluate_resumes_from_its_checkpoint_and_runs_only_what_is_missing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    prompts = quality.needle_prompts(TOKENIZER, lengths=[300], depths=[0.0, 0.5, 1.0], haystack_text=HAYSTACK)
    prompts = [dataclasses.replace(p, max_new_tokens=3) for p in prompts]
    grid = quality.method_grid(["full", "snapkv"], [64], [])
    timing = ["decode_seconds", "prefill_seconds"]
    plain = quality.evaluate(model, TOKENIZER, prompts, grid, progress=False).drop(columns=timing)
    checkpoint = tmp_path / "resume" / "06.jsonl"
    first = quality.evaluate(model, TOKENIZER, prompts, grid, progress=False, checkpoint=checkpoint)
    pd.testing.assert_frame_equal(first.drop(columns=timing), plain)
    lines = checkpoint.read_text().splitlines()
    assert len(lines) == 3  # one line per prompt
    checkpoint.write_text(lines[1] + "\n" + lines[2][:40])  # prompt 1 finished; an interrupted write after it
    ran = []
    original = runner.answers_with_shared_prefill
    monkeypatch.setattr(runner, "answers_with_shared_prefill", lambda *a, **k: ran.append(a[1]) or original(*a, **k))
    resumed = quality.evaluate(model, TOKENIZER, prompts, grid, progress=False, checkpoint=checkpoint)
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), plain)
    middle = (resumed.depth == 0.5).to_numpy()  # read back from the file: even its timings are the first run's
    pd.testing.assert_frame_equal(resumed[middle], first[middle])
    assert ran == [prompts[0].context_ids, prompts[2].context_ids]
    ran.clear()  # another method grid is another key: everything runs again
    quality.evaluate(model, TOKENIZER, prompts, quality.method_grid(["full"], [], []), progress=False,
                     checkpoint=checkpoint)
    assert len(ran) == 3
    ran.clear()  # the same grid after a change to the package's code: everything runs again
    monkeypatch.setattr(runner, "code_digest", lambda: "edited")
    quality.evaluate(model, TOKENIZER, prompts, grid, progress=False, checkpoint=checkpoint)
    assert len(ran) == 3
    (checkpoint.parent / "other").write_text("")  # dropping keeps a folder that holds something else
    quality.drop_checkpoint(checkpoint)
    assert not checkpoint.exists() and checkpoint.parent.is_dir()
    (checkpoint.parent / "other").unlink()
    checkpoint.write_text("")
    quality.drop_checkpoint(checkpoint)
    assert not checkpoint.parent.exists()
