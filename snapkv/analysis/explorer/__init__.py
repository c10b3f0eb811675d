"""Explore a saved trace, one head at a time: tables of votes, kept positions and generated rows (tables) and
their figures (figures). `notebooks/09_explorer.ipynb` wires them to widgets; no model is needed."""

from snapkv.analysis.explorer.figures import (
    MAX_HOVER_CELLS,
    explorer_figure,
    kept_attention_figure,
    static_figure,
)
from snapkv.analysis.explorer.tables import (
    RECORDED,
    cache_head_of,
    default_budget,
    default_gqa,
    default_layer,
    explorer_methods,
    generation_rows,
    generation_rows_or_none,
    generation_table,
    head_table,
    kept_attention_table,
    kept_mask,
    kept_positions,
    kv_heads_of,
    load_tokenizer,
    token_labels,
    window_votes,
)

__all__ = [
    "load_tokenizer", "token_labels", "kv_heads_of", "window_votes", "kept_positions", "kept_mask", "default_gqa",
    "RECORDED", "explorer_methods",
    "cache_head_of", "generation_rows", "head_table", "generation_table", "kept_attention_table",
    "generation_rows_or_none", "default_layer", "default_budget", "MAX_HOVER_CELLS", "explorer_figure",
    "static_figure", "kept_attention_figure",
]
