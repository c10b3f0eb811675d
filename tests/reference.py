"""Reference computations written independently of snapkv, for the exactness tests."""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VISIBLE: dict[int, torch.Tensor] = {}  # layer -> (batch, heads, prompt) bool: prompt positions a query head sees


def masked_reference_attention(module, query, key, value, attention_mask, **kwargs):
    """Full-cache attention in which single-token (decoding) queries cannot see evicted prompt positions."""
    visible = VISIBLE.get(module.layer_idx)
    if visible is None or query.shape[-2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
    allowed = torch.ones(query.shape[0], query.shape[1], 1, key.shape[-2], dtype=torch.bool)
    allowed[..., : visible.shape[-1]] = visible[:, :, None, :]
    logits = (query.float() @ key.transpose(2, 3)) * kwargs["scaling"]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ value).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("masked_reference", masked_reference_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("masked_reference", sdpa_mask)


def visible_prompt(kept: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(batch, cache_heads, prompt_len) bool: True at the kept positions of `kept` (batch, cache_heads, slots),
    whose -1 entries (unused slots) mark nothing."""
    visible = torch.zeros(*kept.shape[:2], prompt_len + 1, dtype=torch.bool)
    return visible.scatter_(2, torch.where(kept >= 0, kept, prompt_len), True)[..., :prompt_len]


def masked_decode_logits(model, tokens, prompt_len, kept_positions):
    """Logits of each decoding step (batch, steps, vocab): full-cache prefill of tokens[:, :prompt_len],
    then tokens fed one by one while each head sees only its kept prompt positions and the new tokens."""
    heads = model.config.num_attention_heads
    VISIBLE.clear()
    for layer, kept in kept_positions.items():
        VISIBLE[layer] = visible_prompt(kept, prompt_len).repeat_interleave(heads // kept.shape[1], dim=1)
    previous = model.config._attn_implementation
    model.set_attn_implementation("masked_reference")
    try:
        out = model(tokens[:, :prompt_len], use_cache=True)
        cache, rows = out.past_key_values, [out.logits[:, -1]]
        for i in range(tokens.shape[1] - prompt_len - 1):
            out = model(tokens[:, prompt_len + i : prompt_len + i + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[:, -1])
    finally:
        model.set_attn_implementation(previous)
        VISIBLE.clear()
    return torch.stack(rows, 1)


def direct_hit_rate(obs, rows, window, k, threshold):
    """The paper's hit rate written with Python sets: sum |I & V| / sum |I| over heads and tokens.

    obs (batch, heads, window, prompt_len); rows (batch, heads, tokens, prompt_len); V = top-k prefix
    positions by summed window attention; I = prefix positions a token attends to above threshold.
    Returns (hits, important)."""
    prompt_len = obs.shape[-1]
    hits = important = 0
    for b in range(obs.shape[0]):
        for h in range(obs.shape[1]):
            votes = obs[b, h, :, : prompt_len - window].sum(0)
            voted = set(votes.argsort(descending=True)[:k].tolist())
            for t in range(rows.shape[2]):
                imp = {p for p in range(prompt_len - window) if rows[b, h, t, p] > threshold}
                hits += len(imp & voted)
                important += len(imp)
    return hits, important
