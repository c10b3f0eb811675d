"""The paper's observation experiments: does the observation window predict what generation attends to?

attention (one sequence: recorded attention -> per-layer metrics) -> experiments (one function per notebook:
prompt set in, tidy DataFrame out; each notebook's settings) -> metrics (voted/important/reference sets, hit
rate, bootstrap summaries) -> readings (the notebooks' conclusions as text) -> plots (one function per figure)."""

from snapkv.analysis.observation.attention import (
    WindowVotes,
    generation_attention,
    greedy_continuation,
    greedy_continuations,
    hit_rate_along_generation,
    teacher_forced_attention,
    voted_overlap,
    windows_along_prompt,
)
from snapkv.analysis.observation.experiments import (
    HitRateSettings,
    QuestionOverlapSettings,
    QuestionPositionSettings,
    VotingVariantsSettings,
    WindowsAlongPromptSettings,
    hit_rate_experiment,
    layer_thirds,
    question_overlap_experiment,
    question_position_experiment,
    run_over_samples,
    shortest_records,
    voting_variants_experiment,
    windows_along_prompt_experiment,
    windows_samples,
)
from snapkv.analysis.observation.metrics import (
    COUNTS,
    DEPTH_METRICS,
    REFERENCES,
    hit_rate_by_depth,
    hit_rate_table,
    important_positions,
    main_protocol,
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
    hit_rate_by_depth_figure,
    observation_metrics_figure,
    question_overlap_figure,
    question_position_figure,
    sensitivity_figure,
    voting_variants_figure,
    windows_along_prompt_figure,
)
from snapkv.analysis.observation.readings import (
    hit_rate_by_depth_reading,
    hit_rate_reading,
    hit_rate_verdict,
    interval_verdict,
    last_vs_earliest,
    question_overlap_reading,
    question_position_reading,
    voting_variants_reading,
    windows_along_prompt_reading,
)

__all__ = [
    "voted_set", "important_positions", "REFERENCES", "reference_set", "sink_positions", "token_metrics", "COUNTS",
    "ratios", "pool", "DEPTH_METRICS", "main_protocol", "hit_rate_by_depth", "hit_rate_by_depth_figure",
    "hit_rate_by_depth_reading", "reference_sets", "metric_records", "hit_rate_table", "sensitivity_table", "summarize",
    "hit_rate_along_generation", "generation_attention", "teacher_forced_attention", "greedy_continuation",
    "greedy_continuations",
    "voted_overlap", "run_over_samples", "WindowVotes", "windows_along_prompt", "hit_rate_experiment",
    "windows_along_prompt_experiment", "question_overlap_experiment", "question_position_experiment",
    "voting_variants_experiment", "HitRateSettings", "WindowsAlongPromptSettings", "QuestionOverlapSettings",
    "QuestionPositionSettings", "VotingVariantsSettings", "shortest_records", "windows_samples", "layer_thirds",
    "hit_rate_verdict", "hit_rate_reading", "interval_verdict", "last_vs_earliest", "windows_along_prompt_reading",
    "question_overlap_reading", "question_position_reading", "voting_variants_reading", "REFERENCE_STYLE",
    "hit_rate_along_generation_figure", "sensitivity_figure", "windows_along_prompt_figure",
    "question_overlap_figure", "question_position_figure", "head_heatmap_figure", "voting_variants_figure",
    "observation_metrics_figure",
]
