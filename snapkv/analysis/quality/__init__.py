"""Long-context quality: needle-in-a-haystack and a RULER-style task suite, SnapKV against baselines.

prompts (what is asked) -> methods (which policies, and each experiment's defaults) -> runner (answers from one
shared prefill per prompt) -> scoring (each answer) -> statistics (calibration, retention, suite means) ->
ablation (pooling) -> plots (one function per figure).
"""

from snapkv.analysis.quality.ablation import (
    pooling_ablation,
)
from snapkv.analysis.quality.methods import (
    ABLATION_BUDGETS,
    ABLATION_METHODS,
    CALIBRATED,
    CALIBRATION_THRESHOLD,
    DEFAULT_BUDGETS,
    DEFAULT_METHODS,
    KERNEL_SIZE,
    METHODS,
    MODES,
    POOLING,
    QUICK_BUDGETS,
    QUICK_LENGTHS,
    QUICK_METHODS,
    SNAPKV_FAMILY,
    WINDOW_SIZE,
    Method,
    NeedleSettings,
    TaskSettings,
    check_lengths_fit,
    check_methods,
    method_grid,
    method_policy,
)
from snapkv.analysis.quality.prompts import (
    CITIES,
    CODE_INSTRUCTION,
    CODE_QUESTION,
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    NEEDLE_FORMATS,
    TASKS,
    WORDS,
    QualityPrompt,
    check_lengths,
    check_samples,
    needle_fact,
    needle_prompts,
    task_prompts,
)
from snapkv.analysis.quality.readings import (
    accuracy_by_model_reading,
)
from snapkv.analysis.quality.runner import (
    DEFAULT_PREFILL_CHUNK,
    GeneratedAnswer,
    answers_with_shared_prefill,
    calibrated_evaluate,
    drop_checkpoint,
    evaluate,
    needle_retention,
    needle_retention_experiment,
    needle_tokens,
)
from snapkv.analysis.quality.scoring import (
    contains_score,
    edit_similarity,
    first_code_line,
    prefix_score,
    score_answer,
)
from snapkv.analysis.quality.statistics import (
    accuracy_by_model,
    calibrate,
    retention_table,
    successor_checks,
    suite_means,
    summarize_quality,
    target_checks,
    with_full_score,
)

__all__ = [
    "accuracy_by_model", "accuracy_by_model_reading",
    "DEFAULT_LENGTHS", "DEFAULT_DEPTHS", "TASKS", "NEEDLE_FORMATS", "CITIES", "WORDS", "QualityPrompt",
    "needle_fact", "check_lengths", "check_samples", "needle_prompts", "CODE_INSTRUCTION", "CODE_QUESTION",
    "task_prompts", "DEFAULT_BUDGETS", "ABLATION_BUDGETS", "WINDOW_SIZE", "KERNEL_SIZE", "METHODS",
    "ABLATION_METHODS", "DEFAULT_METHODS", "MODES", "POOLING", "Method", "method_policy", "check_methods",
    "method_grid", "check_lengths_fit", "QUICK_METHODS", "QUICK_BUDGETS", "QUICK_LENGTHS", "NeedleSettings",
    "TaskSettings", "DEFAULT_PREFILL_CHUNK", "GeneratedAnswer", "answers_with_shared_prefill", "evaluate",
    "drop_checkpoint", "needle_tokens", "needle_retention", "needle_retention_experiment", "calibrated_evaluate",
    "contains_score", "prefix_score", "first_code_line", "edit_similarity", "score_answer", "CALIBRATION_THRESHOLD",
    "calibrate", "with_full_score", "retention_table", "summarize_quality", "suite_means", "target_checks",
    "SNAPKV_FAMILY", "CALIBRATED", "successor_checks", "pooling_ablation",
]
