"""The one sample loop, the observation notebooks' settings, and notebook 01's one recording per answer."""

import dataclasses
from dataclasses import fields

import pandas as pd
import pytest
import torch
from tiny_models import AsciiTokenizer, tiny_model

from snapkv.analysis.observation import experiments
from snapkv.analysis.observation.attention import teacher_forced_attention
from snapkv.analysis.observation.metrics import sensitivity_table
from snapkv.analysis.reporting.setup import resolve_settings
from snapkv.analysis.text import chat_ids, chat_request

SETTINGS = (experiments.HitRateSettings, experiments.WindowsAlongPromptSettings, experiments.QuestionOverlapSettings,
            experiments.QuestionPositionSettings, experiments.VotingVariantsSettings)


def test_run_over_samples_tags_each_table_with_its_sample_then_its_tags():
    def measure(sample):
        for part in range(sample):
            yield pd.DataFrame({"value": [sample * 10 + part]}), dict(part=part, size=sample)

    table = experiments.run_over_samples(measure, [2, 0, 1])
    assert list(table.columns) == ["value", "sample", "part", "size"]
    assert table.to_dict("list") == {"value": [20, 21, 10], "sample": [0, 0, 2], "part": [0, 1, 0], "size": [2, 2, 1]}


@pytest.mark.parametrize("kind", SETTINGS)
def test_profiles_name_real_fields_and_shrink_the_run(kind):
    names = {field.name for field in fields(kind)}
    assert set(kind.QUICK) <= names and set(kind.DEFAULT) <= names
    quick, default, full = (resolve_settings(kind, profile) for profile in ("quick", "default", "full"))
    assert full == kind() and quick.n_samples < default.n_samples < full.n_samples
    assert resolve_settings(kind, "quick", n_samples=7).n_samples == 7  # an explicit parameter wins over a profile


def test_layer_thirds_labels_each_layer_with_its_span():
    labels = experiments.layer_thirds(pd.Series([0, 1, 2, 3, 4, 5, 6, 7, 8]), 9)
    assert labels.tolist() == ["layers 0-2"] * 3 + ["layers 3-5"] * 3 + ["layers 6-8"] * 3


def test_hit_rate_experiment_sweeps_sensitivity_on_its_own_reference_recordings():
    model, tokenizer = tiny_model("llama"), AsciiTokenizer()
    samples = [dict(module=f"m{i}", context=f"x{i} = {i}\n" * 12, response=f"y = {i}\n" * 8) for i in range(3)]
    settings = experiments.HitRateSettings(n_samples=3, window_size=8, generation_window=8, steps=2, top_k=0.1,
                                           threshold=0.011, protocols=("greedy", "reference"), n_sensitivity=2)
    table, sensitivity = experiments.hit_rate_experiment(model, tokenizer, samples, settings)
    assert sorted(table["sample"].unique()) == [0, 1, 2] and set(table.protocol) == {"greedy", "reference"}
    assert sorted(sensitivity["sample"].unique()) == [0, 1]
    for index in (0, 1):  # each equals a sweep over a recording of its own of the reference answer
        prompt = chat_ids(tokenizer, chat_request(samples[index], tokenizer))
        ids = torch.tensor(prompt + tokenizer(samples[index]["response"]).input_ids[:16])[None]
        expected = sensitivity_table(*teacher_forced_attention(model, ids, len(prompt), 8), window_size=8)
        got = sensitivity[sensitivity["sample"] == index].drop(columns="sample").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)
    _, none = experiments.hit_rate_experiment(model, tokenizer, samples[:1],
                                              dataclasses.replace(settings, protocols=("greedy",)))
    assert none.empty
