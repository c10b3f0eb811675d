"""The queries a layer would ask, rebuilt from its input: what `ExpectedAttention` predicts future attention with.

`prerope_queries` projects the attention module's input as the module does before RoPE (q_proj, then q_norm where
the module has one: Qwen3, Gemma 3); `rope_frequencies` reads the rotary embedding of the layer's type from the
config as transformers builds it (Gemma 3's full-attention layers have their own theta); `average_rotation` is
RoPE's rotation averaged over a span of future positions (kvpress's `apply_avg_rope`).
"""

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def prerope_queries(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """float32 (batch, heads, n, head_dim): the queries of `hidden_states` (batch, n, hidden), the module's input,
    before RoPE. TypeError for a module without `q_proj` (a fused qkv projection)."""
    projection = getattr(module, "q_proj", None)
    if projection is None:
        raise TypeError(f"{type(module).__name__} has no q_proj: ExpectedAttention rebuilds queries from a separate "
                        "query projection (Llama, Qwen, Mistral, Gemma 3)")
    batch, n, _ = hidden_states.shape
    head_dim = module.head_dim
    queries = projection(hidden_states)
    norm = getattr(module, "q_norm", None)
    if norm is not None and norm.weight.shape[-1] != head_dim:  # a norm of the whole projection (OLMo 2)
        queries, norm = norm(queries), None
    queries = queries.view(batch, n, -1, head_dim).transpose(1, 2)
    if norm is not None:  # a norm of each head (Qwen3, Gemma 3)
        queries = norm(queries)
    return queries.float()


def rope_frequencies(config, layer: int, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies float32 (head_dim / 2,), attention scaling) of layer `layer`'s rotary embedding: the
    config's `rope_parameters`, or their entry for the layer's type when they have one per type (Gemma 3). Scaled
    RoPE types (linear, llama3, yarn, ...) go through transformers' own initialisation; the frequencies a dynamic
    type would recompute for long inputs are not followed. ValueError for RoPE on part of the head only."""
    parameters = config.rope_parameters
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[layer] if layer_types and isinstance(parameters.get(layer_types[layer]), dict) else None
    if layer_type is not None:
        parameters = parameters[layer_type]
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{config.model_type} rotates part of each head (partial_rotary_factor "
                         f"{parameters['partial_rotary_factor']}): ExpectedAttention averages RoPE over whole heads")
    rope_type = parameters.get("rope_type", "default")
    if rope_type == "default":
        inverse = 1.0 / parameters["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
        return inverse, 1.0
    by_type = {"layer_type": layer_type} if layer_type is not None else {}
    inverse, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **by_type)
    if inverse.numel() * 2 != head_dim:
        raise ValueError(f"{config.model_type}'s {rope_type} RoPE has {inverse.numel()} frequencies for heads of "
                         f"{head_dim}: ExpectedAttention averages RoPE over whole heads")
    return inverse.float(), float(scaling)


def average_rotation(inverse_frequencies: torch.Tensor, scaling: float, start: int, count: int) -> torch.Tensor:
    """float32 (head_dim, head_dim): RoPE's rotation (transformers' rotate_half layout) averaged over positions
    start .. start + count - 1, R = mean_t cos_t I + sin_t P with P x = rotate_half(x): R q is the mean of the
    query q rotated to those positions."""
    positions = torch.arange(start, start + count, dtype=torch.float)
    angles = positions[:, None] * inverse_frequencies[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().mean(dim=0) * scaling, angles.sin().mean(dim=0) * scaling
    half = inverse_frequencies.numel()
    rotate_half = torch.zeros(2 * half, 2 * half)
    rotate_half[:half, half:] = -torch.eye(half)
    rotate_half[half:, :half] = torch.eye(half)
    return torch.diag(cos) + sin[:, None] * rotate_half
