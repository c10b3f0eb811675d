"""The paper's observation experiments: does the observation window predict what generation attends to?

attention (one sequence: recorded attention -> per-layer metrics) -> experiments (one function per notebook:
prompt set in, tidy DataFrame out) -> metrics (voted/important/reference sets, hit rate, bootstrap summaries)
-> plots (one function per figure)."""

from snapkv.analysis.observation.attention import (
    WindowVotes,
    greedy_continuation,
    hit_rate_along_generation,
    run_over_samples,
    teacher_forced_attention,
    voted_overlap,
    windows_along_prompt,
)
from snapkv.analysis.observation.experiments import (
    hit_rate_experiment,
    question_overlap_experiment,
    question_position_experiment,
    sensitivity_experiment,
    voting_variants_experiment,
    windows_along_prompt_experiment,
)
from snapkv.analysis.observation.metrics import (
    COUNTS,
    REFERENCES,
    hit_rate_table,
    important_set,
    metric_records,
    pool,
    ratios,
    reference_set,
    reference_sets,
    sensitivity_table,
    sink_positions,
    summarize,
    token_metrics,
    voted_set,
)
from snapkv.analysis.observation.plots import (
    REFERENCE_STYLE,
    head_heatmap_figure,
    hit_rate_along_generation_figure,
    observation_metrics_figure,
    question_overlap_figure,
    question_position_figure,
    sensitivity_figure,
    voting_variants_figure,
    windows_along_prompt_figure,
)

__all__ = [
    "voted_set", "important_set", "REFERENCES", "reference_set", "sink_positions", "token_metrics", "COUNTS",
    "ratios", "pool", "reference_sets", "metric_records", "hit_rate_table", "sensitivity_table", "summarize",
    "hit_rate_along_generation", "teacher_forced_attention", "greedy_continuation", "voted_overlap",
    "run_over_samples", "WindowVotes", "windows_along_prompt", "hit_rate_experiment", "sensitivity_experiment",
    "windows_along_prompt_experiment", "question_overlap_experiment", "question_position_experiment",
    "voting_variants_experiment", "REFERENCE_STYLE", "hit_rate_along_generation_figure", "sensitivity_figure",
    "windows_along_prompt_figure", "question_overlap_figure", "question_position_figure", "head_heatmap_figure",
    "voting_variants_figure", "observation_metrics_figure",
]
