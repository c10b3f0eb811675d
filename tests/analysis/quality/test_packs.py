"""Notebook 11's functions (snapkv.analysis.quality.packs): settings, the runner's question-agnostic mode against a
pack, the speed summary, figure and readings from tables built here; the real-model parts are slow."""

import math

import pandas as pd
import pytest
import torch
from tiny_models import tiny_model

import snapkv
from snapkv.analysis.quality import packs
from snapkv.analysis.quality.methods import Method
from snapkv.analysis.quality.runner import answers_with_shared_prefill
from snapkv.analysis.reporting.setup import resolve_settings


def test_settings_and_their_profiles_are_checked():
    assert resolve_settings(packs.PackSettings, "quick").lengths == packs.PackSettings.QUICK["lengths"]
    assert resolve_settings(packs.PackSettings, "default").lengths == packs.PackSettings.DEFAULT["lengths"]
    assert packs.PackSettings().policy == snapkv.SnapKV(window_size=16, max_capacity_prompt=512, kernel_size=5)
    with pytest.raises(ValueError, match="lengths is empty"):
        packs.PackSettings(lengths=())
    with pytest.raises(ValueError, match="must exceed window_size"):
        packs.PackSettings(budget=16)
    with pytest.raises(ValueError, match="must exceed the budget \\(512\\)"):
        packs.PackSettings(lengths=(500, 2000))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        packs.PackSettings(repeats=0)


def test_runner_question_agnostic_mode_answers_as_a_pack_does(one_thread):
    """The notebook reuses `quality.evaluate`'s question-agnostic mode for what a compressed pack answers."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    context, tail = torch.randint(1, 128, (1, 60), generator=generator), torch.randint(1, 128, (1, 6),
                                                                                       generator=generator)
    methods = [Method("full", None, snapkv.FullCache()),
               Method("snapkv", 24, snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=3)),
               Method("h2o", 20, snapkv.H2O(max_capacity_prompt=20, window_size=8)),
               Method("streaming", 20, snapkv.StreamingLLM(max_capacity_prompt=20))]
    answers = answers_with_shared_prefill(model, context[0].tolist(), tail[0].tolist(), methods,
                                          modes=("question-agnostic",), max_new_tokens=6)
    for method in methods:
        tokens = snapkv.pack(model, context, method.policy).generate(tail, max_new_tokens=6, do_sample=False)
        assert tokens[0, 66:].tolist() == answers[("question-agnostic", method.name, method.budget)].tokens


def timings_table():
    """Two lengths; recomputing takes 2 s and 4 s (medians of 3 questions), the full pack 0.5 s and 1 s."""
    rows = []
    for length, recompute in ((1000, (1.0, 2.0, 9.0)), (2000, (4.0, 3.0, 5.0))):
        rows += [dict(length=length, method="recompute", budget=None, question=i, ttft_s=s)
                 for i, s in enumerate(recompute)]
        full = length / 2000
        rows += [dict(length=length, method="full pack", budget=None, question=i, ttft_s=full, pack_s=3.0,
                      load_s=0.2, memory_mib=length / 10, disk_mib=length / 10 + 0.1) for i in range(3)]
        rows += [dict(length=length, method="snapkv-128 pack", budget=128, question=i, ttft_s=0.1, pack_s=3.5,
                      load_s=0.1, memory_mib=12.8, disk_mib=12.9) for i in range(3)]
    return pd.DataFrame.from_records(rows)


def test_pack_summary_takes_medians_and_speedups():
    summary = packs.pack_summary(timings_table()).set_index(["length", "method"])
    assert summary.loc[(1000, "recompute"), "ttft_s"] == 2.0 and summary.loc[(2000, "recompute"), "ttft_s"] == 4.0
    assert summary.loc[(1000, "full pack"), "speedup"] == pytest.approx(2.0 / 0.5)
    assert summary.loc[(2000, "snapkv-128 pack"), "speedup"] == pytest.approx(40.0)
    assert summary.loc[(2000, "recompute"), "speedup"] == 1.0 and summary.questions.eq(3).all()
    assert math.isnan(summary.loc[(2000, "recompute"), "memory_mib"])


def test_pack_speed_reading_is_about_the_longest_context():
    reading = packs.pack_speed_reading(timings_table())
    assert reading.startswith("At 2000 context tokens, recomputing context + question takes 4.00 s")
    assert "full pack: 1.000 s (4.0x faster)" in reading
    assert "snapkv-128 pack: 0.100 s (40.0x faster)" in reading
    assert "15.5x smaller on disk than the full pack (200.1 MiB) and 15.6x in memory" in reading


def test_pack_speed_figure_draws_every_method_and_both_sizes():
    figure, interactive = packs.pack_speed_figure(timings_table(), "test")
    names = [trace.name for trace in interactive.data]
    assert names == ["recompute", "full pack", "full pack, memory", "full pack, disk", "snapkv-128 pack",
                     "snapkv-128 pack, memory", "snapkv-128 pack, disk"]
    assert list(interactive.data[0].y) == [2.0, 4.0]
    assert len(figure.axes[1].lines) == 4


def test_question_cost_reading_compares_the_modes_per_method_and_budget():
    rows = []
    for sample in range(4):
        for mode, snap in (("question-aware", 1.0 if sample < 3 else 0.0), ("question-agnostic", 0.25 * (sample < 1))):
            rows.append(dict(task="needle", length=1000, depth=0.5, sample=sample, mode=mode, method="full",
                             budget=pd.NA, score=1.0))
            rows.append(dict(task="needle", length=1000, depth=0.5, sample=sample, mode=mode, method="snapkv",
                             budget=128, score=snap))
    table = pd.DataFrame.from_records(rows).astype({"budget": "Int64"})
    reading = packs.question_cost_reading(table)
    assert "over 4 prompts (needle)" in reading
    assert "- full cache: 1.00 with the question in view, 1.00 without (+0.00)" in reading
    assert "- snapkv @ 128: 0.75 with the question in view, 0.06 without (+0.69)" in reading
    assert "costs up to 0.69 (snapkv @ 128) and +0.69 on average" in reading
    swapped = table.assign(mode=table["mode"].map({"question-aware": "question-agnostic",
                                                   "question-agnostic": "question-aware"}))
    assert "cost nothing here" in packs.question_cost_reading(swapped)


@pytest.mark.slow
def test_document_and_question_ids_make_the_chat_prompt(smollm):
    from snapkv.analysis.text import chat_ids

    _, tokenizer = smollm
    document, question = "def f():\n    return 1", "What does f return?"
    ids = torch.cat([packs.document_ids(tokenizer, document), packs.question_ids(tokenizer, question)], 1)
    assert tokenizer.decode(ids[0]) == tokenizer.decode(chat_ids(tokenizer, f"{document}\n\n{question}"))


@pytest.mark.slow
def test_pack_timings_on_the_real_model(smollm):
    model, tokenizer = smollm
    settings = packs.PackSettings(lengths=(200,), budget=64, repeats=2)
    timings = packs.pack_timings(model, tokenizer, settings, progress=False)
    summary = packs.pack_summary(timings).set_index("method")
    assert list(summary.index) == ["recompute", "full pack", "snapkv-64 pack"] and summary.questions.eq(2).all()
    full, compressed = summary.loc["full pack"], summary.loc["snapkv-64 pack"]
    assert compressed.memory_mib < full.memory_mib * 64 / 200 * 1.05
    for row in (full, compressed):
        assert row.memory_mib < row.disk_mib < row.memory_mib + 0.2  # the tensors, plus metadata
