"""`snapkv.compress(model, policy)`: compress the prompt KV cache after prefill, per head.

Timeline of one prompt, per layer (all inside the attention hook):
  prefill call(s)      full cache; remember the last `window_size` queries (H2O: accumulate scores)
  first decoding step  select kept positions, gather K/V into a CompressedLayer, attend on it
  later steps          decode on the compressed cache; new tokens are appended as usual
A forward that starts from an empty cache starts a new prompt, so nothing carries over between calls.
Prefill may be chunked (`prefill_chunk_size`): compression waits for the first single-token step,
or for the next forward after `session.compress_before_next_forward()`.
"""

import contextlib
from dataclasses import dataclass

import torch

from snapkv.core.cache import CompressedLayer
from snapkv.core.hook import ACTIVE_TAPS, ATTN_IMPLEMENTATION, AttentionCall
from snapkv.core.policies import Policy, PrefillView, accumulate


@dataclass
class _LayerPrefill:
    """What one layer saw of the current prompt so far."""

    query_window: torch.Tensor
    padding_mask: torch.Tensor | None
    accumulated: torch.Tensor | None = None
    done: bool = False


def append_window(previous: torch.Tensor | None, query: torch.Tensor, window: int) -> torch.Tensor:
    """The last `window` query rows, copied: a slice would keep the whole prompt's queries alive."""
    joined = query if previous is None else torch.cat([previous, query], dim=-2)
    return joined[..., -window:, :].clone()


def _cache_from_call(args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if hasattr(cache, "layers") else None


def _prompt_lengths(args, kwargs) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if mask is not None:
        return mask.sum(-1)
    if ids is not None:
        return torch.full((ids.shape[0],), ids.shape[-1])
    return None


class CompressionSession:
    """Active while a `compress` block runs; a tap of the attention hook.

    kept_positions[layer]: long (batch, cache_heads, kept) prompt positions of the last compressed
    prompt, ascending, counted from each row's first real token; -1 marks slots a short row left unused.
    """

    def __init__(self, model, policy: Policy, prefill_chunk_size: int | None = None):
        self.model = model
        self.policy = policy
        self.prefill_chunk_size = prefill_chunk_size
        self.kept_positions: dict[int, torch.Tensor] = {}
        self._layers: dict[int, _LayerPrefill] = {}
        self._cache = None
        self._calls_this_forward = 0
        self._force_compress = False

    def compress_before_next_forward(self) -> None:
        """Treat the prompt as complete: the next forward (of any length) runs on the compressed cache.
        Use it to append text after compression, e.g. a question the compression did not see."""
        self._force_compress = True

    # -- model forward hooks ------------------------------------------------------------------
    def before_forward(self, module, args, kwargs):
        self._calls_this_forward = 0
        self._cache = _cache_from_call(args, kwargs)
        fresh = self._cache is None or self._cache.get_seq_length() == 0
        lengths = _prompt_lengths(args, kwargs)
        whole_prompt = self.prefill_chunk_size is None
        if fresh and whole_prompt and lengths is not None and self.policy.window_size:
            shortest = int(lengths.min())
            if shortest < self.policy.window_size:
                raise ValueError(
                    f"the prompt has {shortest} tokens but window_size is {self.policy.window_size}: "
                    "use a longer prompt or a smaller window_size"
                )

    def after_forward(self, module, args, kwargs, output):
        self._force_compress = False
        if self._calls_this_forward == 0:
            raise RuntimeError(
                "snapkv.compress saw no attention call during this forward: the model's attention does not "
                "go through transformers' AttentionInterface, so nothing was compressed"
            )

    # -- attention hook --------------------------------------------------------------------------
    def before_attention(self, call: AttentionCall) -> AttentionCall:
        self._calls_this_forward += 1
        budget = self.policy.budget(call.layer)
        if call.sliding or budget is None:
            return call
        layer_cache = self._cache.layers[call.layer] if self._cache is not None else None
        if isinstance(layer_cache, CompressedLayer) and call.past_length > 0:
            return call.with_kv(
                mask=layer_cache.attention_mask(call.query_length, call.query.shape[1]),
                past_length=layer_cache.get_seq_length() - call.query_length,
                slot_positions=layer_cache.slot_positions(),
            )
        state = self._layers.get(call.layer)
        if call.past_length == 0:  # a new prompt
            state = None
            self.kept_positions.pop(call.layer, None)
        if state is not None and state.done:
            return call
        if state is not None and (call.query_length == 1 or self._force_compress):
            return self._compress(call, state, budget)
        self._layers[call.layer] = self._observe(call, state)
        return call

    def after_attention(self, call: AttentionCall) -> None:
        pass

    def _observe(self, call: AttentionCall, state: _LayerPrefill | None) -> _LayerPrefill:
        padding = call.padding_mask()
        accumulated = None
        if self.policy.needs_accumulated_attention:
            accumulated = accumulate(state.accumulated if state else None, call.query, call.key,
                                     call.scaling, padding)
        window = max(self.policy.window_size, 1)
        return _LayerPrefill(
            query_window=append_window(state.query_window if state else None, call.query, window),
            padding_mask=padding, accumulated=accumulated,
        )

    def _compress(self, call: AttentionCall, state: _LayerPrefill, budget: int) -> AttentionCall:
        n = call.past_length
        state.done = True
        padding = state.padding_mask
        if padding is not None:
            padding = padding[:, :n]
            padding = None if bool(padding.all()) else padding
        view = PrefillView(query_window=state.query_window, keys=call.key[:, :, :n], padding_mask=padding,
                           scaling=call.scaling, accumulated=state.accumulated)
        positions = self.policy.kept_positions(view, budget)
        self.kept_positions[call.layer] = _prompt_positions(positions, padding)
        if n <= budget:
            return call  # the budget covers the prompt: keep the cache as it is
        groups = positions.shape[1] // call.key.shape[1]
        keys, values = call.key, call.value
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        index = positions.clamp(min=0)[..., None].expand(-1, -1, -1, keys.shape[-1])
        new_keys = torch.cat([keys[:, :, :n].gather(2, index), keys[:, :, n:]], dim=2)
        new_values = torch.cat([values[:, :, :n].gather(2, index), values[:, :, n:]], dim=2)
        layer = CompressedLayer(new_keys, new_values, positions, prompt_length=n, groups=groups)
        self._cache.layers[call.layer] = layer
        return call.with_kv(
            key=new_keys, value=new_values, mask=layer.attention_mask(call.query_length, call.query.shape[1]),
            slot_positions=layer.slot_positions(),
        )


def _prompt_positions(positions: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Input positions -> positions counted from each row's first real token (-1 stays -1)."""
    if padding is None:
        return positions.clone()
    first_real = padding.long().argmax(-1)
    return torch.where(positions >= 0, positions - first_real[:, None, None], -1)


@contextlib.contextmanager
def attach(model, tap, hooks_on_forward: bool = True):
    """Route `model`'s attention through the snapkv hook while `tap` is active."""
    previous_impl = model.config._attn_implementation
    if previous_impl != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    handles = []
    if hooks_on_forward:
        handles.append(model.register_forward_pre_hook(tap.before_forward, with_kwargs=True))
        handles.append(model.register_forward_hook(tap.after_forward, with_kwargs=True))
    token = ACTIVE_TAPS.set(ACTIVE_TAPS.get() + (tap,))
    try:
        yield tap
    finally:
        ACTIVE_TAPS.reset(token)
        for handle in handles:
            handle.remove()
        if previous_impl != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(previous_impl)


@contextlib.contextmanager
def compress(model, policy: Policy, *, prefill_chunk_size: int | None = None):
    """Compress every prompt the model prefills inside the block with `policy`.

    prefill_chunk_size: prefill `generate` prompts in chunks of this many tokens (transformers'
    chunked prefill), so long prompts never hold full-sequence activations.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a snapkv policy (SnapKV(), FullCache(), ...), got {type(policy).__name__}")
    policy.check_model(model.config.get_text_config().num_hidden_layers)
    if prefill_chunk_size is not None:
        if isinstance(prefill_chunk_size, bool) or not isinstance(prefill_chunk_size, int):
            raise TypeError(f"prefill_chunk_size must be an int, got {type(prefill_chunk_size).__name__}")
        if prefill_chunk_size < max(policy.window_size, 1):
            raise ValueError(
                f"prefill_chunk_size ({prefill_chunk_size}) must be at least window_size ({policy.window_size})"
            )
    session = CompressionSession(model, policy, prefill_chunk_size)
    previous_chunk = model.generation_config.prefill_chunk_size
    model.generation_config.prefill_chunk_size = prefill_chunk_size
    try:
        with attach(model, session):
            yield session
    finally:
        model.generation_config.prefill_chunk_size = previous_chunk
