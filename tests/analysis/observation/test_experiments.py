"""The one sample loop and the observation notebooks' settings."""

from dataclasses import fields

import pandas as pd
import pytest

from snapkv.analysis.observation import experiments
from snapkv.analysis.reporting.setup import resolve_settings

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
def test_quick_overrides_name_real_fields_and_shrink_the_run(kind):
    names = {field.name for field in fields(kind)}
    assert set(kind.QUICK) <= names
    quick, full = resolve_settings(kind, True), kind()
    assert quick.n_samples < full.n_samples
    assert resolve_settings(kind, True, n_samples=7).n_samples == 7  # an explicit parameter wins over quick


def test_layer_thirds_labels_each_layer_with_its_span():
    labels = experiments.layer_thirds(pd.Series([0, 1, 2, 3, 4, 5, 6, 7, 8]), 9)
    assert labels.tolist() == ["layers 0-2"] * 3 + ["layers 3-5"] * 3 + ["layers 6-8"] * 3
