"""`snapkv.compress(model, policy)`: compress the prompt KV cache after prefill, per head.

Timeline of one prompt, per layer (all inside the attention hook):
  prefill              remember what the policy `observes` (the last `window_size` queries, the attention
                       accumulated over every query, the attention module's input, the prompt's ids); when the whole
                       prompt comes in one forward, select the kept positions right after the layer's
                       prefill attention and put a CompressedLayer in the cache, so that only one layer's
                       full keys and values are alive at a time (the paper's prefill memory)
  first decoding step  (chunked prefill) select kept positions, gather K/V into a CompressedLayer, attend on it
  later steps          decode on the compressed cache; new tokens are appended as usual
A forward that starts from an empty cache starts a new prompt, so nothing carries over between calls.
Prefill may come in chunks (`prefill_chunk_size`, whose chunks never end on a single token): later chunks
need the earlier keys, so compression then waits for the first single-token forward, or for the next forward
after `session.compress_before_next_forward()`. A caller that feeds a prompt in several forwards of its own
must say so with `prefill_chunk_size` (the first one would be taken for the whole prompt). Both timings keep
the same positions and give the same outputs. `session.fork(policy)` starts another policy from what a
session saw of a prefill, so that many policies share one prefill (with `compat.copy_cache`).
A policy that observes "reconstruction" (KVzip) scores the prompt with forwards of its own on the whole prompt's
cache (`Policy.reconstruct`): its layers are compressed together, at the end of the prompt's forward (or, when the
prompt came in chunks, at the forward that compresses it, before it runs), right after those forwards.
Those scores are computed once per prompt state and reconstruction setting, and shared: a session keeps them in a
dict keyed by (`policy.reconstruction_key`: KVzip's, through the wrappers, which delegate
`reconstruct`; the prompt: its ids' shape and values and its padding, i.e. the tokens the cache holds) -> {layer:
scores}, which `fork` hands to the forked session by reference and which a session starts anew when it sees a
new prompt (an empty cache). Forks of one observer, each on its own `compat.copy_cache` of the same prefill, thus run
the reconstruction once per prompt state (after the context; after context + question) for every budget and window
of one KVzip setting; a fork that needs layers not yet scored scores only those. The scores are read, never changed.
"""

import contextlib
from dataclasses import dataclass

import torch

from snapkv.core import compat
from snapkv.core.cache import CompressedLayer, RaggedLayer, SlotArena
from snapkv.core.hook import (
    ACTIVE_TAPS,
    ATTN_IMPLEMENTATION,
    AttentionCall,
    Tap,
    check_kernel,
    check_left_padding,
    using_kernel,
)
from snapkv.core.policies import FullCache, Policy, PrefillView, accumulate, check_int


@dataclass
class _LayerPrefill:
    """What one layer saw of the current prompt so far (what the policy does not observe stays None; all None
    once the layer is compressed)."""

    query_window: torch.Tensor | None
    padding_mask: torch.Tensor | None
    accumulated: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    done: bool = False


def append_window(previous: torch.Tensor | None, query: torch.Tensor, window: int) -> torch.Tensor:
    """The last `window` query rows, copied: a slice would keep the whole prompt's queries alive."""
    joined = query if previous is None else torch.cat([previous, query], dim=-2)
    return joined[..., -window:, :].clone()


def _forward_length(args, kwargs) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    inputs = ids if ids is not None else kwargs.get("inputs_embeds")
    return 0 if inputs is None else inputs.shape[1]


def _prompt_lengths(args, kwargs) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if mask is not None:
        return mask.sum(-1)
    if ids is not None:
        return torch.full((ids.shape[0],), ids.shape[-1])
    return None


class CompressionSession(Tap):
    """Active while a `compress` block runs; a tap of the attention hook.

    kept_positions[layer]: long (batch, cache_heads, kept) prompt positions of the last compressed
    prompt, ascending, counted from each row's first real token; -1 marks slots a short row left unused.
    """

    user, effect = "snapkv.compress", "nothing was compressed"

    def __init__(self, model, policy: Policy, prefill_chunk_size: int | None = None, *, observe_only: bool = False):
        """observe_only: remember what prefill shows the policy but never compress (a session to `fork` from)."""
        self.model = model
        self.policy = policy
        self.prefill_chunk_size = prefill_chunk_size
        self.observe_only = observe_only
        self.observes = policy.observes  # what prefill records (`observer` widens it)
        self.window = max(policy.window_size, 1)  # query rows kept when "query_window" is observed
        self.observes_hidden_states = "hidden_states" in self.observes
        self._hidden: dict[int, torch.Tensor] = {}  # a layer's attention input of this forward, until observed
        self.kept_positions: dict[int, torch.Tensor] = {}
        self._layers: dict[int, _LayerPrefill] = {}
        self._cache = None
        self._forward_ids: torch.Tensor | None = None  # the current forward's input_ids
        self._force_compress = False
        self._prompt_in_this_forward = False
        self._arena = SlotArena()  # where the current prompt's compressed layers keep their tensors
        self.compressed_layers = full_attention_layers(model.config)  # the layers a policy may compress
        # "reconstruction" (KVzip): the layers whose compression waits for the end of the prompt's forward (their
        # last call, query emptied), and the policy's scores of the whole prompt
        self._deferred: dict[int, AttentionCall] = {}
        self._reconstruction: dict[int, torch.Tensor] = {}
        # the current prompt's reconstruction scores {(reconstruction key, prompt): {layer: scores}}, shared with
        # this session's forks (`fork` hands it on; a new prompt starts a new dict)
        self._reconstructions: dict[tuple, dict[int, torch.Tensor]] = {}

    @classmethod
    def observer(cls, model, policies, prefill_chunk_size: int | None = None) -> "CompressionSession":
        """A session that only observes prefill, for every policy of `policies`: the widest window and every
        observation one of them asks for. `fork` each policy from it (many policies, one prefill)."""
        session = cls(model, FullCache(), prefill_chunk_size, observe_only=True)
        session.observes = frozenset().union(*(policy.observes for policy in policies))
        session.window = max([max(policy.window_size, 1) for policy in policies] + [1])
        session.observes_hidden_states = "hidden_states" in session.observes
        return session

    def compress_now(self, cache, calls: dict[int, AttentionCall]) -> None:
        """Compress the prompt prefilled into `cache` now, as the session would at the next forward after
        `compress_before_next_forward()`: `calls` {layer: its last prefill call, query emptied} is what a
        forward of no new tokens would show the session (`snapkv.pack` keeps them)."""
        self._cache, self._prompt_in_this_forward = cache, False
        self.compress_before_next_forward()
        if "reconstruction" in self.observes and not self.observe_only:
            self._reconstruct()
        for layer in sorted(calls):
            self.before_attention(calls[layer])
        self.after_forward(None, (), {}, None)

    def compress_before_next_forward(self) -> None:
        """Treat the prompt as complete: the next forward (of any length) runs on the compressed cache.
        Use it to append text after compression, e.g. a question the compression did not see."""
        self._force_compress = True

    def fork(self, policy: Policy) -> "CompressionSession":
        """A session for `policy` that continues from what this one saw of the current prompt's prefill
        (what `policy.observes`: the last `policy.window_size` queries of every layer, the accumulated attention,
        the attention inputs), nothing compressed yet. Attach it with a `compat.copy_cache` of the prefilled cache:
        several policies then decode from one prefill, each exactly as if it had prefilled the prompt itself."""
        window = max(policy.window_size, 1)
        if not self._layers:
            raise RuntimeError("nothing to fork: this session has seen no prefill (run the prompt inside it first)")
        missing = policy.observes - self.observes
        if missing:
            raise ValueError(f"{type(policy).__name__} observes {', '.join(sorted(missing))}, which this session did "
                             f"not record: prefill under CompressionSession.observer(model, policies)")
        if "query_window" in policy.observes and window > self.window:
            raise ValueError(f"this session kept {self.window} queries per layer but the policy needs "
                             f"{window}: prefill under a session whose window_size is at least {window}")
        forked = CompressionSession(self.model, policy, self.prefill_chunk_size)
        for layer, state in self._layers.items():
            forked._layers[layer] = _LayerPrefill(
                query_window=state.query_window[..., -window:, :] if "query_window" in policy.observes else None,
                padding_mask=state.padding_mask,
                accumulated=state.accumulated if "accumulated_attention" in policy.observes else None,
                hidden_states=state.hidden_states if "hidden_states" in policy.observes else None,
                input_ids=state.input_ids if "input_ids" in policy.observes else None)
        forked._reconstructions = self._reconstructions  # by reference: forks share the reconstruction scores
        return forked

    # -- model forward hooks ------------------------------------------------------------------
    def before_forward(self, module, args, kwargs):
        self._cache = compat.forward_cache(kwargs)
        self._forward_ids = kwargs.get("input_ids", args[0] if args else None)
        fresh = self._cache is None or self._cache.get_seq_length() == 0
        if fresh:
            self._arena = SlotArena()
            self._reconstructions = {}  # a new prompt: forks taken before keep the previous prompt's dict
        if "reconstruction" in self.observes:
            self._follow_prompt(args, kwargs, fresh)
        # the whole prompt in this one forward: compress each layer right after its prefill attention (a policy
        # that observes "reconstruction": every layer at the end of the forward, `after_forward`)
        self._prompt_in_this_forward = fresh and self.prefill_chunk_size is None and _forward_length(args, kwargs) > 1
        if _forward_length(args, kwargs) > 1:  # prefill: the mask is checked once per chunk, not per step
            check_left_padding(kwargs.get("attention_mask"), "snapkv.compress")
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
        deferred, self._deferred = self._deferred, {}
        if deferred and self._prompt_in_this_forward:
            self.compress_now(self._cache, deferred)  # every layer, from the whole prompt's cache
        self._force_compress = False
        self._prompt_in_this_forward = False

    def _follow_prompt(self, args, kwargs, fresh: bool) -> None:
        """(a policy that observes "reconstruction") At the forward that will compress the prompt (a decoding step,
        or any forward after `compress_before_next_forward`), score it first with the policy's `reconstruct`, while
        the cache holds the whole prompt and nothing else."""
        if fresh:
            self._deferred, self._reconstruction = {}, {}
        elif (not self.observe_only and any(not state.done for state in self._layers.values())
              and (_forward_length(args, kwargs) == 1 or self._force_compress)):
            self._reconstruct()

    def _reconstruct(self) -> None:
        """The policy's `reconstruct` scores of the prompt the cache holds, for every layer still to compress whose
        budget is below some row's length (no forward at all when the budget covers the prompt)."""
        pending = [layer for layer, state in self._layers.items() if not state.done]
        if not pending or self._cache is None:
            return
        n = self._cache.layers[pending[0]].get_seq_length()
        state = self._layers[pending[0]]
        padding = None if state.padding_mask is None else state.padding_mask[:, :n]
        lengths = set(padding.sum(-1).tolist()) if padding is not None else {n}
        layers = self.compressed_layers

        def compressed(layer: int) -> bool:
            among = layers if layer in layers else (layer,)
            return any(length > self.policy.layer_budget(layer, length, among) for length in lengths)

        needed = [layer for layer in pending if compressed(layer)]
        if not needed:
            return
        if state.input_ids is None or state.input_ids.shape[1] != n:
            seen = 0 if state.input_ids is None else state.input_ids.shape[1]
            raise ValueError(f"{type(self.policy).__name__} reconstructs the whole prompt from its ids, but this "
                             f"session saw {seen} of the {n} tokens in the cache: run the whole prompt inside the "
                             "session, as input_ids")
        self._reconstruction = self._reconstruction_scores(state.input_ids, padding, needed)

    def _reconstruction_scores(self, input_ids: torch.Tensor, padding: torch.Tensor | None,
                               layers: list[int]) -> dict[int, torch.Tensor]:
        """The policy's `reconstruct` scores of `layers`, from the session's store when a policy with the same
        `reconstruction_key` (this session or another fork of its observer) scored this prompt already; only the
        layers not yet scored are computed. A policy without a key computes them every time."""
        key = self.policy.reconstruction_key
        if key is None:
            return self.policy.reconstruct(self.model, self._cache, input_ids, padding, layers)
        prompt = (tuple(input_ids.shape), tuple(input_ids.flatten().tolist()),
                  None if padding is None else tuple(padding.flatten().tolist()))
        known = self._reconstructions.setdefault((key, prompt), {})
        missing = [layer for layer in layers if layer not in known]
        if missing:
            known.update(self.policy.reconstruct(self.model, self._cache, input_ids, padding, missing))
        return {layer: known[layer] for layer in layers}

    def before_attention_module(self, layer: int, hidden_states: torch.Tensor) -> None:
        self._hidden[layer] = hidden_states

    def after_attention(self, call: AttentionCall) -> None:
        state = self._layers.get(call.layer)
        if (self._prompt_in_this_forward and not self.observe_only and state is not None and not state.done
                and self._cache is not None):
            if "reconstruction" in self.observes:  # scored from the whole prompt's cache: at the end of the forward
                batch, heads, _, head_dim = call.query.shape
                self._deferred[call.layer] = call.with_kv(query=call.query.new_empty(batch, heads, 0, head_dim),
                                                          mask=None, past_length=call.key.shape[-2])
                return
            self._compress(call, state, call.key.shape[-2])  # the layer's full keys live no longer than this

    # -- attention hook --------------------------------------------------------------------------
    def before_attention(self, call: AttentionCall) -> AttentionCall:
        if call.sliding or (self.policy.budget(call.layer) is None and not self.observe_only):
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
        if state is not None and not self.observe_only and (call.query_length == 1 or self._force_compress):
            return self._compress(call, state, call.past_length)
        self._layers[call.layer] = self._observe(call, state)
        return call

    def _observe(self, call: AttentionCall, state: _LayerPrefill | None) -> _LayerPrefill:
        padding = call.padding_mask()
        query_window = accumulated = hidden_states = input_ids = None
        if "query_window" in self.observes:
            query_window = append_window(state.query_window if state else None, call.query, self.window)
        if "accumulated_attention" in self.observes:
            accumulated = accumulate(state.accumulated if state else None, call.query, call.key,
                                     call.scaling, padding)
        if "hidden_states" in self.observes:
            new = self._hidden.pop(call.layer)
            hidden_states = new if state is None else torch.cat([state.hidden_states, new], dim=1)
        if "input_ids" in self.observes:
            if self._forward_ids is None:
                raise ValueError(f"{type(self.policy).__name__} reads the prompt's token ids, but the forward got "
                                 "inputs_embeds: call the model with input_ids")
            new = self._forward_ids
            input_ids = new if state is None else torch.cat([state.input_ids, new], dim=1)
        return _LayerPrefill(query_window=query_window, padding_mask=padding, accumulated=accumulated,
                             hidden_states=hidden_states, input_ids=input_ids)

    def _compress(self, call: AttentionCall, state: _LayerPrefill, n: int) -> AttentionCall:
        """Select the kept positions of the layer's first `n` slots (the prompt) and put the compressed layer in
        the cache; the call's slots after `n` (this forward's new tokens, if any) are appended to it."""
        state.done = True
        layers = self.compressed_layers if call.layer in self.compressed_layers else (call.layer,)

        def budget(length: int) -> int:  # of a row of `length` real tokens
            return self.policy.layer_budget(call.layer, length, layers)

        padding = state.padding_mask
        if padding is not None:
            padding = padding[:, :n]
            padding = None if bool(padding.all()) else padding
        hidden_states = None if state.hidden_states is None else state.hidden_states[:, :n]
        input_ids = None if state.input_ids is None else state.input_ids[:, :n]
        view = PrefillView(keys=call.key[:, :, :n], padding_mask=padding, scaling=call.scaling,
                           query_window=state.query_window, accumulated=state.accumulated,
                           values=call.value[:, :, :n], hidden_states=hidden_states, module=call.module,
                           reconstruction=self._reconstruction.pop(call.layer, None), input_ids=input_ids)
        positions = self.policy.kept_positions(view, budget)
        # done with: freed, not left among the heap's holes
        state.query_window = state.accumulated = state.hidden_states = state.input_ids = None
        self.kept_positions[call.layer] = _prompt_positions(positions, padding)  # outlives the cache: not in the arena
        if n <= budget(n):
            return call  # the budget covers the prompt: keep the cache as it is
        groups = positions.shape[1] // call.key.shape[1]
        keys, values = call.key, call.value
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        index = positions.clamp(min=0)[..., None].expand(-1, -1, -1, keys.shape[-1])
        new_keys = torch.cat([keys[:, :, :n].gather(2, index), keys[:, :, n:]], dim=2)
        new_values = torch.cat([values[:, :, :n].gather(2, index), values[:, :, n:]], dim=2)
        kind = RaggedLayer if self.policy.per_head_slots else CompressedLayer
        # the layer's tensors go into the prompt's arena, off glibc's heap, so the freed full keys can be reused
        tensors, settings = kind(new_keys, new_values, positions, prompt_length=n, groups=groups).state()
        layer = kind.from_state({name: self._arena.place(t) for name, t in tensors.items()}, settings)
        self._cache.layers[call.layer] = layer
        return call.with_kv(
            key=new_keys, value=new_values, mask=layer.attention_mask(call.query_length, call.query.shape[1]),
            slot_positions=layer.slot_positions(),
        )


def full_attention_layers(config) -> tuple[int, ...]:
    """Indices of the layers that attend over the whole prompt (not sliding-window or chunked layers, which a
    policy never compresses), from the config's `layer_types` when it has them."""
    config = config.get_text_config()
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return tuple(i for i, kind in enumerate(types) if kind not in ("sliding_attention", "chunked_attention"))


def _prompt_positions(positions: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Input positions -> positions counted from each row's first real token (-1 stays -1)."""
    if padding is None:
        return positions.clone()
    first_real = padding.long().argmax(-1)
    return torch.where(positions >= 0, positions - first_real[:, None, None], -1)


def _check_attention_seen(tap: Tap) -> None:
    if tap.attention_calls == 0:
        raise RuntimeError(
            f"{tap.user} saw no attention call during this forward: the model's attention does not go through "
            f"transformers' AttentionInterface, so {tap.effect}"
        )


def _attention_input_hook(tap: Tap, layer: int):
    """A forward pre-hook of layer `layer`'s attention module that shows its input to `tap`."""

    def hook(module, args, kwargs):
        tap.before_attention_module(layer, compat.attention_input(args, kwargs))

    return hook


@contextlib.contextmanager
def attach(model, tap: Tap, *, prefill_chunk_size: int | None = None):
    """Route `model`'s attention through the snapkv hook while `tap` is active; the hook runs the kernel the
    model was loaded with ("sdpa" or "eager": `hook.KERNELS`; any other raises a ValueError).

    prefill_chunk_size: prompts that `generate` prefills run in chunks of this many tokens
    (`compat.chunked_prefill_hook`), before any tap sees the forward.
    """
    if isinstance(tap, CompressionSession):
        active = [t for t in ACTIVE_TAPS.get() if isinstance(t, CompressionSession)]
        if active:
            raise RuntimeError(
                f"snapkv.compress blocks cannot nest: {active[0].policy!r} is already compressing, and two sessions "
                "would compress the same cache twice. Leave the first block before entering one with another "
                "policy (snapkv.record may still wrap or sit inside a compress block)"
            )
    previous_impl = compat.attention_implementation(model)
    hooked = previous_impl == ATTN_IMPLEMENTATION  # an enclosing block already routes the model through the hook
    kernel = contextlib.nullcontext() if hooked else using_kernel(model, check_kernel(previous_impl))
    handles = []
    if tap.observes_hidden_states:
        for layer, module in compat.attention_modules(model).items():
            handles.append(module.register_forward_pre_hook(_attention_input_hook(tap, layer), with_kwargs=True))
    if prefill_chunk_size is not None:
        chunker = compat.chunked_prefill_hook(prefill_chunk_size)
        handles.append(model.register_forward_pre_hook(chunker, with_kwargs=True, prepend=True))
    handles.append(model.register_forward_pre_hook(lambda *_: setattr(tap, "attention_calls", 0)))
    handles.append(model.register_forward_pre_hook(tap.before_forward, with_kwargs=True))
    handles.append(model.register_forward_hook(tap.after_forward, with_kwargs=True))
    handles.append(model.register_forward_hook(lambda *_: _check_attention_seen(tap)))
    token = ACTIVE_TAPS.set(ACTIVE_TAPS.get() + (tap,))
    try:
        with kernel:
            if not hooked:
                compat.set_attention_implementation(model, ATTN_IMPLEMENTATION)
            yield tap
    finally:
        ACTIVE_TAPS.reset(token)
        for handle in handles:
            handle.remove()
        if not hooked:
            compat.set_attention_implementation(model, previous_impl)


@contextlib.contextmanager
def compress(model, policy: Policy, *, prefill_chunk_size: int | None = None):
    """Compress every prompt the model prefills inside the block with `policy`.

    prefill_chunk_size: prefill `generate` prompts in chunks of this many tokens, so long prompts never
    hold full-sequence activations (exact for every prompt length: see `compat.chunk_bounds`).
    Blocks do not nest; a `snapkv.record` block may wrap this one or sit inside it.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a snapkv policy (SnapKV(), FullCache(), ...), got {type(policy).__name__}")
    policy.check_model(model.config.get_text_config().num_hidden_layers)
    if prefill_chunk_size is not None:
        check_int("prefill_chunk_size", prefill_chunk_size, 2)
        if prefill_chunk_size < policy.window_size:
            raise ValueError(
                f"prefill_chunk_size ({prefill_chunk_size}) must be at least window_size ({policy.window_size})"
            )
    session = CompressionSession(model, policy, prefill_chunk_size)
    with attach(model, session, prefill_chunk_size=prefill_chunk_size):
        yield session
