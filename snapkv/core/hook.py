"""The one integration point: an attention function registered with transformers' AttentionInterface.

It wraps the kernel the model was loaded with and shows every call to the active taps (compression,
recording), held in a ContextVar. A tap (`Tap`) may swap the keys/values/mask before the kernel (the
compressor does on decoding steps) and reads the call after it (the compressor compresses a layer there when
the whole prompt came in one forward).

Kernels (`KERNELS`): "sdpa" and "eager" (the model file's own eager function, e.g. Gemma 3's soft-capping
one). `attach` remembers the model's kernel while the hook is in place (`using_kernel`), and the hook runs
exactly that kernel, so `compress` and `record` keep the user's choice. Taps see one mask format whatever the
kernel (SDPA's: None for plain causal, else bool, True = visible); the hook turns it into the additive float
mask an eager kernel adds. Any other implementation (flash attention, flex attention, a custom function)
raises a ValueError when a block is entered, naming the kernels to load the model with instead: their masks
cannot express a compressed cache's per-head slots.
"""

import contextlib
import contextvars
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from snapkv.core import compat

ATTN_IMPLEMENTATION = "snapkv"
KERNELS = ("sdpa", "eager")  # the attention implementations the hook wraps
ACTIVE_TAPS: contextvars.ContextVar[tuple] = contextvars.ContextVar("snapkv_taps", default=())
# (id of a hooked model's text config, the kernel it was loaded with): its attention modules hold that config
MODEL_KERNELS: contextvars.ContextVar[tuple] = contextvars.ContextVar("snapkv_kernels", default=())


@dataclass(frozen=True)
class AttentionCall:
    """One layer's attention call, as the kernel saw it.

    query (batch, heads, q, head_dim) post-RoPE; key/value (batch, cache_heads, slots, head_dim);
    mask: what SDPA got (None, or bool/additive broadcastable to (batch, heads, q, slots));
    past_length: tokens (logical, padding included) before this call; slot_positions
    (batch, cache_heads, slots) input position of each slot (-1: masked), None when slot i is position i.
    """

    module: torch.nn.Module
    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    sliding: bool
    past_length: int
    slot_positions: torch.Tensor | None = None

    @property
    def query_length(self) -> int:
        return self.query.shape[-2]

    def padding_mask(self) -> torch.Tensor | None:
        """(batch, slots) bool, real tokens as seen by the last query row; None when nothing is masked."""
        return key_padding_mask(self.mask, self.key.shape[-2])

    def with_kv(self, **changes) -> "AttentionCall":
        return replace(self, **changes)


def key_padding_mask(mask: torch.Tensor | None, slots: int) -> torch.Tensor | None:
    """Keys visible to the last query row of a 4-D mask, as (batch, slots) bool; None if no mask."""
    if mask is None:
        return None
    last_row = mask[:, 0, -1, -slots:]
    return last_row.clone() if last_row.dtype == torch.bool else last_row == 0  # not a view of the whole mask


class Tap:
    """Something that watches (and may change) a model's attention calls while it is attached
    (`snapkv.core.compress.attach`). The defaults do nothing; subclasses override what they need.

    Order contract, for every forward of the model:
      before_forward(module, args, kwargs)   model forward pre-hook, taps in entry order
      for every attention layer:
        before_attention(call) -> call       every tap in entry order, each given the previous one's call
        the SDPA kernel                      on the last returned call's key/value/mask
        after_attention(call)                every tap in entry order, all given that same last call
      after_forward(module, args, kwargs, output)   model forward hook, taps in entry order
    So a tap entered outside another one sees, in after_attention, the cache the kernel really used.
    `attach` also counts each forward's attention calls per tap (`attention_calls`) and raises when a forward
    made none: the model's attention bypassed the hook, so the tap would silently do nothing.
    """

    user = "snapkv"  # who attached the tap, and what it would have done: named in the error above
    effect = "nothing was done"
    attention_calls = 0
    observes_hidden_states = False  # `attach` then calls before_attention_module with each layer's input

    def before_forward(self, module, args, kwargs) -> None:
        pass

    def before_attention_module(self, layer: int, hidden_states: torch.Tensor) -> None:
        """The attention module of `layer` is about to run on `hidden_states` (batch, q, hidden)."""

    def after_forward(self, module, args, kwargs, output) -> None:
        pass

    def before_attention(self, call: AttentionCall) -> AttentionCall:
        return call

    def after_attention(self, call: AttentionCall) -> None:
        pass


def check_left_padding(mask, user: str) -> None:
    """Raise when a forward's 2-D attention_mask (batch, tokens) has padding after a real token."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
        raise ValueError(f"the attention_mask pads on the right: {user} needs left padding "
                         "(tokenizer.padding_side = 'left')")


def check_kernel(name: str | None) -> str:
    """`name` when the hook can wrap that attention implementation; else a ValueError naming the fix."""
    if name not in KERNELS:
        raise ValueError(f"snapkv wraps the {' and '.join(map(repr, KERNELS))} attention kernels, but the model runs "
                         f"{name!r}: load it with attn_implementation=\"sdpa\" (or \"eager\"), or call "
                         "model.set_attn_implementation(\"sdpa\")")
    return name


@contextlib.contextmanager
def using_kernel(model, kernel: str):
    """While the block runs, the hook runs `kernel` ("sdpa" or "eager") for `model`'s attention modules."""
    token = MODEL_KERNELS.set(MODEL_KERNELS.get() + ((id(model.config.get_text_config()), check_kernel(kernel)),))
    try:
        yield
    finally:
        MODEL_KERNELS.reset(token)


def eager_mask(mask: torch.Tensor | None, query_length: int, slots: int, dtype: torch.dtype, device) -> torch.Tensor:
    """What an eager kernel adds to its logits, (batch or 1, heads or 1, q, slots) float, from what SDPA is given:
    None (causal, the last query sees every slot) or bool (True = visible)."""
    if mask is None:
        causal = torch.ones(query_length, slots, dtype=torch.bool, device=device).tril(slots - query_length)
        mask = causal[None, None]
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)


def run_kernel(kernel: str, module, query, key, value, mask, dropout, scaling, *, kernel_module=None, **kwargs):
    """One attention call of `module` on `kernel`, given `kernel_module` (default: `module`) as its module;
    dropout and scaling by keyword (model files order them differently)."""
    if kernel == "eager":
        mask = eager_mask(mask, query.shape[-2], key.shape[-2], query.dtype, query.device)
    attention = compat.attention_function(module, kernel)
    return attention(kernel_module or module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def snapkv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention signature: another library's wrapper may pass dropout and scaling by position."""
    kernel = dict(MODEL_KERNELS.get()).get(id(module.config), "sdpa")
    taps = ACTIVE_TAPS.get()
    if not taps:
        return run_kernel(kernel, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    sliding = bool(kwargs.get("sliding_window") or getattr(module, "sliding_window", None))
    call = AttentionCall(
        module=module, layer=module.layer_idx, query=query, key=key, value=value, mask=attention_mask,
        scaling=scaling or query.shape[-1] ** -0.5, sliding=sliding, past_length=key.shape[-2] - query.shape[-2],
    )
    for tap in taps:
        tap.attention_calls += 1
    for tap in taps:
        call = tap.before_attention(call)
    kernel_module = None
    if call.key.shape[1] == query.shape[1] and getattr(module, "num_key_value_groups", 1) > 1:
        # gqa="expand": the cache already holds one head per query head
        kernel_module = SimpleNamespace(num_key_value_groups=1, is_causal=getattr(module, "is_causal", True),
                                        training=module.training, head_dim=query.shape[-1])
    out, weights = run_kernel(kernel, module, query, call.key, call.value, call.mask, dropout, scaling,
                              kernel_module=kernel_module, **kwargs)
    for tap in taps:
        tap.after_attention(call)
    return out, weights


AttentionInterface.register(ATTN_IMPLEMENTATION, snapkv_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
