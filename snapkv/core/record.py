"""`snapkv.record(model)`: record what every attention head looks at, through the one attention hook.

Per layer and query head, in input positions of the prompt (see `snapkv.core.trace`):
  prefill    the observation window's attention over the prompt (window x n), exactly the probabilities
             SnapKV votes with (`observation_attention`); recomputed at each prefill chunk, the last one kept
  decoding   one row per step: the new token's attention over the cache, mapped back to prompt positions
             (zeros where the cache evicted a position), plus the mass it puts on generated tokens
Nothing builds an n x n matrix. The recorder reads each call in `after_attention`, when every tap's
`before_attention` has run, so it sees the cache the kernel used whether it is entered before or after
`snapkv.compress`.

A forward starting from an empty cache starts a new prompt (a new `Trace`). Multi-token forwards that
follow it are prefill chunks; the first single-token forward starts decoding. `prefill_chunk_size` runs
`generate` prompts in chunks that never end on a single token (as `snapkv.compress` does).
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch

from snapkv.core import compat
from snapkv.core.compress import CompressionSession, append_window, attach
from snapkv.core.environment import environment
from snapkv.core.hook import ACTIVE_TAPS, AttentionCall, Tap, check_left_padding
from snapkv.core.policies import SnapKV, check_int
from snapkv.core.selection import observation_attention
from snapkv.core.trace import FORMAT_VERSION, REDUCERS, Trace

FLOAT_BYTES = 4


# -- pure tensor functions ---------------------------------------------------------------------------
def attention_rows(
    query: torch.Tensor,
    keys: torch.Tensor,
    visible: torch.Tensor | None,
    *,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of a few query rows, in float32.

    query (batch, heads, rows, head_dim); keys (batch, cache_heads, slots, head_dim), each cache head serving
    heads // cache_heads consecutive query heads; visible bool broadcastable to (batch, heads, rows, slots),
    None when every slot is visible; bias: optional additive float mask of the same shape.
    Returns float32 (batch, heads, rows, slots): softmax(q k^T * scaling) over visible slots, 0 elsewhere;
    a row that sees nothing (a padding query) is all zeros.
    """
    batch, heads, rows, head_dim = query.shape
    cache_heads, slots = keys.shape[1], keys.shape[2]
    grouped = query.float().reshape(batch, cache_heads, heads // cache_heads * rows, head_dim)
    logits = torch.matmul(grouped, keys.float().transpose(2, 3)).view(batch, heads, rows, slots) * scaling
    if bias is not None:
        logits = logits + bias.float()
    if visible is None:
        return torch.softmax(logits, dim=-1)
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def visible_slots(
    row_positions: torch.Tensor,
    slot_positions: torch.Tensor,
    *,
    real: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Which slots each query row may attend to, from positions alone.

    row_positions (rows,) input positions of the queries; slot_positions (batch, heads, slots) input position
    of each key slot (-1: empty); real (batch, positions) bool, False on padding; sliding_window: a query at
    r sees keys p with r - p < sliding_window (transformers' convention). Returns bool (batch, heads, rows, slots).
    """
    slots = slot_positions[:, :, None, :]
    rows = row_positions[None, None, :, None]
    visible = (slots >= 0) & (slots <= rows)
    if sliding_window is not None:
        visible = visible & (rows - slots < sliding_window)
    if real is not None:
        batch, heads, count = slot_positions.shape
        is_real = real.bool().gather(1, slot_positions.clamp(min=0).reshape(batch, -1)).view(batch, heads, 1, count)
        visible = visible & is_real
    return visible


def to_prompt_positions(
    probs: torch.Tensor, slot_positions: torch.Tensor, prompt_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots -> prompt positions.

    probs (batch, heads, rows, slots); slot_positions (batch, heads, slots) input positions (-1: empty).
    Returns (float32 (batch, heads, rows, prompt_length) with zeros at positions no slot holds,
    float32 (batch, heads, rows) the mass on slots at or after prompt_length, i.e. on generated tokens).
    """
    slots = slot_positions[:, :, None, :].expand_as(probs)
    in_prompt = (slots >= 0) & (slots < prompt_length)
    generated = torch.where(slots >= prompt_length, probs, 0.0).sum(-1)
    out = probs.new_zeros(*probs.shape[:-1], prompt_length)
    out.scatter_add_(-1, torch.where(in_prompt, slots, 0), torch.where(in_prompt, probs, 0.0))
    return out, generated


# -- memory estimate ---------------------------------------------------------------------------------
def estimate_trace_bytes(
    *,
    layers: int,
    heads: int,
    batch: int,
    prompt_length: int,
    window_size: int,
    generated: int,
    reducer: str = "raw",
    reduce_window: int = 128,
    top_k: int = 32,
) -> dict[str, int]:
    """Bytes a trace holds, by part: {"observation", "generation", "total"}.

    observation: layers x batch x heads x min(window, n) x n float32; generation (per `generated` row):
    "raw" n floats, "window_sum" n floats per window of `reduce_window` rows, "topk" k (position, value)
    pairs; every reducer also keeps one float per row (the mass on generated tokens).
    """
    per_head = layers * batch * heads
    observation = per_head * min(window_size, prompt_length) * prompt_length * FLOAT_BYTES
    if reducer == "raw":
        rows = generated * prompt_length * FLOAT_BYTES
    elif reducer == "window_sum":
        rows = math.ceil(generated / reduce_window) * prompt_length * FLOAT_BYTES
    elif reducer == "topk":
        rows = generated * min(top_k, prompt_length) * 2 * FLOAT_BYTES
    else:
        raise ValueError(f"reducer must be one of {REDUCERS}, got {reducer!r}")
    generation = per_head * (rows + generated * FLOAT_BYTES)
    return {"observation": observation, "generation": generation, "total": observation + generation}


def _gib(count: int) -> str:
    return f"{count:,} bytes ({count / 2**30:.2f} GiB)"


# -- storage of generated rows -----------------------------------------------------------------------
class _Rows:
    """Generated rows of one layer under one reducer, in buffers that grow up to `max_rows`."""

    def __init__(self, reducer: str, shape: tuple[int, int, int], capacity: int, reduce_window: int, top_k: int,
                 max_rows: int | None = None):
        self.reducer, self.reduce_window, self.max_rows = reducer, reduce_window, max_rows
        self.batch, self.heads, self.width = shape
        self.top_k = min(top_k, self.width)
        self.count = 0
        self.buffers: dict[str, torch.Tensor] = {}
        self._allocate(max(capacity, 1))

    def _sizes(self, capacity: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        b, h, n = self.batch, self.heads, self.width
        sizes = {"generated_mass": ((b, h, capacity), torch.float32)}
        if self.reducer == "raw":
            sizes["generation"] = ((b, h, capacity, n), torch.float32)
        elif self.reducer == "window_sum":
            windows = math.ceil(capacity / self.reduce_window)
            sizes["generation_window_sums"] = ((b, h, windows, n), torch.float32)
        else:
            sizes["generation_topk_positions"] = ((b, h, capacity, self.top_k), torch.int32)
            sizes["generation_topk_values"] = ((b, h, capacity, self.top_k), torch.float32)
        return sizes

    def _allocate(self, capacity: int) -> None:
        new = {}
        for name, (shape, dtype) in self._sizes(capacity).items():
            new[name] = torch.zeros(shape, dtype=dtype)
            old = self.buffers.get(name)
            if old is not None:
                new[name][:, :, : old.shape[2]] = old
        self.buffers, self.capacity = new, capacity

    def append(self, prompt_rows: torch.Tensor, mass: torch.Tensor) -> None:
        """prompt_rows float32 (batch, heads, rows, n); mass (batch, heads, rows)."""
        rows = prompt_rows.shape[2]
        if self.count + rows > self.capacity:
            grown = max(2 * self.capacity, self.count + rows)
            self._allocate(grown if self.max_rows is None else max(min(grown, self.max_rows), self.count + rows))
        start, stop = self.count, self.count + rows
        self.buffers["generated_mass"][:, :, start:stop] = mass
        if self.reducer == "raw":
            self.buffers["generation"][:, :, start:stop] = prompt_rows
        elif self.reducer == "window_sum":
            window = torch.arange(start, stop) // self.reduce_window
            self.buffers["generation_window_sums"].index_add_(2, window, prompt_rows)
        else:
            top = prompt_rows.topk(self.top_k, dim=-1)
            self.buffers["generation_topk_positions"][:, :, start:stop] = top.indices.int()
            self.buffers["generation_topk_values"][:, :, start:stop] = top.values
        self.count = stop

    def tensors(self, final: bool) -> dict[str, torch.Tensor]:
        """The rows recorded so far. `final`: the buffers are handed over instead of copied when they are
        exactly full (the usual case: capacity = the planned rows), so closing a trace never doubles it."""
        out = {}
        for name, buffer in self.buffers.items():
            used = math.ceil(self.count / self.reduce_window) if name == "generation_window_sums" else self.count
            out[name] = buffer if final and used == buffer.shape[2] else buffer[:, :, :used].clone()
        return out


# -- the recorder ------------------------------------------------------------------------------------
@dataclass
class _Prompt:
    """Everything recorded about the current prompt."""

    batch: int
    ids: list = field(default_factory=list)  # (batch, q) chunks: prompt, then fed generated tokens
    real: torch.Tensor | None = None  # (batch, tokens so far) bool, the latest 2-D attention mask
    width: int = 0  # prompt tokens so far (input positions)
    complete: bool = False
    steps: int = 0  # decoding forwards seen
    max_rows: int = 0  # generated rows the byte budget allows
    planned_rows: int = 0
    query_window: dict = field(default_factory=dict)  # layer -> (batch, heads, <= window, head_dim)
    observation: dict = field(default_factory=dict)  # layer -> (batch, heads, window, width)
    rows: dict = field(default_factory=dict)  # layer -> _Rows
    kept: dict = field(default_factory=dict)  # layer -> (batch, cache_heads, kept) input positions
    sliding: set = field(default_factory=set)
    policy: str | None = None


class Recorder(Tap):
    """A tap of the attention hook that records attention per layer and head; `trace` is the last prompt's.

    Built by `snapkv.record(...)`; see there for the arguments.
    """

    user, effect = "snapkv.record", "nothing was recorded"

    def __init__(self, model, *, window_size: int = SnapKV.window_size, generation: bool = True,
                 max_bytes: int = 4 * 2**30, reducer: str = "raw", reduce_window: int = 128, top_k: int = 32,
                 max_new_tokens: int | None = None, tokenizer=None, teacher_forced_prompt_length: int | None = None,
                 prefix_ids: torch.Tensor | None = None):
        _check_settings(window_size=window_size, generation=generation, max_bytes=max_bytes, reducer=reducer,
                        reduce_window=reduce_window, top_k=top_k, max_new_tokens=max_new_tokens)
        self.model = model
        self.window_size = window_size
        self.generation = generation
        self.max_bytes = max_bytes
        self.reducer = reducer
        self.reduce_window = reduce_window
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.teacher_forced_prompt_length = teacher_forced_prompt_length
        self.prefix_ids = prefix_ids  # tokens already in the cache that the first forward continues
        self.block_size = 64
        text_config = model.config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        self.num_heads = text_config.num_attention_heads
        self.num_kv_heads = getattr(text_config, "num_key_value_heads", None) or self.num_heads
        self.traces: list[Trace] = []
        self._prompt: _Prompt | None = None
        self._forward_past = 0
        self._forward_length = 0

    # -- results -------------------------------------------------------------------------------------
    @property
    def trace(self) -> Trace:
        """The trace of the latest prompt (of the one being recorded, as recorded so far)."""
        if self._prompt is not None:
            return self._build_trace(self._prompt, final=False)
        if not self.traces:
            raise ValueError("nothing was recorded: run the model (generate or a forward) inside the record block")
        return self.traces[-1]

    def finish(self) -> None:
        """Close the current prompt: its trace joins `traces`."""
        if self._prompt is not None:
            self.traces.append(self._build_trace(self._prompt, final=True))
            self._prompt = None

    # -- model forward hooks -------------------------------------------------------------------------
    def before_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shaped = ids if ids is not None else embeds
        if shaped is None:
            raise ValueError("snapkv.record needs input_ids or inputs_embeds in the forward call")
        batch, length = shaped.shape[0], shaped.shape[1]
        cache = compat.forward_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        real = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        prompt = self._prompt
        prefix = 0 if self.prefix_ids is None else self.prefix_ids.shape[1]
        if past == 0 or (prompt is None and past == prefix):
            self.finish()
            prompt = _Prompt(batch=batch, policy=_active_policy())
            if past:
                prompt.ids.append(self.prefix_ids.cpu())
        elif prompt is None:
            raise ValueError(
                f"snapkv.record must see a prompt from its first token, but this forward continues a cache of "
                f"{past} tokens filled outside the record block: run the whole prompt inside it"
            )
        elif batch != prompt.batch:
            raise ValueError(f"the batch changed from {prompt.batch} to {batch} rows during one prompt "
                             "(beam search or a reordered cache is not supported by snapkv.record)")
        decoding = prompt.complete or (past > 0 and length == 1)
        if prompt.complete and length > 1:
            raise ValueError(
                f"snapkv.record got a {length}-token forward after decoding had started: recording supports a "
                "prompt (in one or several chunks) followed by single-token decoding steps"
            )
        if not decoding:
            check_left_padding(real, "record")
            self._check_prompt_budget(prompt, past + length)  # raises before any model work
            prompt.width = past + length if self.teacher_forced_prompt_length is None else (
                self.teacher_forced_prompt_length)
            self._prompt = prompt
        else:
            prompt.complete = True
            if self.generation:
                self._check_step_budget(prompt)
            prompt.steps += 1
        if ids is not None:
            prompt.ids.append(ids.detach().cpu())
        if real is not None:
            prompt.real = real
        self._forward_past, self._forward_length = past, length

    # -- attention hook ------------------------------------------------------------------------------
    def after_attention(self, call: AttentionCall) -> None:
        prompt = self._prompt
        if prompt is None:
            return
        with torch.no_grad():
            if call.sliding:
                prompt.sliding.add(call.layer)
            if self.teacher_forced_prompt_length is not None:
                self._teacher_forced(call, prompt, self.teacher_forced_prompt_length)
            elif prompt.complete:
                self._decoding_step(call, prompt)
            else:
                self._prefill(call, prompt)

    # -- recording -----------------------------------------------------------------------------------
    def _slot_positions(self, call: AttentionCall) -> torch.Tensor:
        """(batch, query heads, slots) input position of each slot of the call's keys."""
        batch, heads = call.query.shape[:2]
        if call.slot_positions is not None:
            positions = call.slot_positions
            return positions.repeat_interleave(heads // positions.shape[1], dim=1)
        total = self._forward_past + self._forward_length
        slots = call.key.shape[-2]
        return torch.arange(total - slots, total, device=call.key.device).expand(batch, heads, slots)

    def _sliding_window(self, call: AttentionCall) -> int | None:
        if not call.sliding:
            return None
        window = getattr(call.module, "sliding_window", None)
        return window or getattr(self.model.config.get_text_config(), "sliding_window", None)

    def _real(self, prompt: _Prompt, device) -> torch.Tensor | None:
        return None if prompt.real is None else prompt.real.to(device)

    def _observe(self, call, prompt, query_window, keys_end: int) -> torch.Tensor:
        """Observation window rows (batch, heads, window, keys_end) over input positions < keys_end."""
        window = query_window.shape[-2]
        real = self._real(prompt, call.key.device)
        every_key = self._forward_past + self._forward_length == call.key.shape[-2]
        if call.slot_positions is None and not call.sliding and every_key:
            padding = None if real is None else real[:, :keys_end]
            probs = observation_attention(query_window, call.key[:, :, :keys_end], scaling=call.scaling,
                                          padding_mask=padding)
            return probs.nan_to_num(0.0)
        slots = self._slot_positions(call)
        rows = torch.arange(keys_end - window, keys_end, device=call.key.device)
        visible = visible_slots(rows, slots, real=real, sliding_window=self._sliding_window(call))
        probs = attention_rows(query_window, call.key, visible, scaling=call.scaling)
        return to_prompt_positions(probs, slots, keys_end)[0]

    def _prefill(self, call: AttentionCall, prompt: _Prompt) -> None:
        window = append_window(prompt.query_window.get(call.layer), call.query.detach(), self.window_size)
        prompt.query_window[call.layer] = window
        prompt.observation[call.layer] = self._observe(call, prompt, window, prompt.width).cpu()
        self._note_kept(call, prompt)

    def _decoding_step(self, call: AttentionCall, prompt: _Prompt) -> None:
        if prompt.steps == 1:
            self._note_kept(call, prompt)
        if not self.generation:
            return
        real = self._real(prompt, call.key.device)
        bias = None
        mask = call.mask
        last = mask[:, :, -1:, :] if mask is not None and mask.dim() == 4 else None
        if last is not None and last.shape[-1] != call.key.shape[-2]:
            last = None
        if last is not None and last.dtype != torch.bool:
            bias, last = last, None
        every_key = call.key.shape[-2] == self._forward_past + self._forward_length
        if call.slot_positions is None and not call.sliding and every_key and (real is None or bool(real.all())):
            # the common case: slot i is position i, all of them visible
            probs = attention_rows(call.query, call.key, last, scaling=call.scaling, bias=bias)[:, :, 0]
            self._store_rows(call.layer, prompt, probs[:, :, None, : prompt.width],
                             probs[:, :, None, prompt.width :].sum(-1))
            return
        slots = self._slot_positions(call)
        row = torch.tensor([self._forward_past], device=call.key.device)
        visible = visible_slots(row, slots, real=real, sliding_window=self._sliding_window(call))
        if last is not None:
            visible = visible & last
        probs = attention_rows(call.query, call.key, visible, scaling=call.scaling, bias=bias)
        self._store_rows(call.layer, prompt, *to_prompt_positions(probs, slots, prompt.width))

    def _teacher_forced(self, call: AttentionCall, prompt: _Prompt, prompt_length: int) -> None:
        past = self._forward_past  # query i of this forward is input position past + i
        total = past + self._forward_length
        window = call.query[:, :, max(prompt_length - self.window_size, 0) - past : prompt_length - past]
        prompt.observation[call.layer] = self._observe(call, prompt, window, prompt_length).cpu()
        if not self.generation:
            return
        slots = self._slot_positions(call)
        real = self._real(prompt, call.key.device)
        sliding_window = self._sliding_window(call)
        for start in range(prompt_length, total, self.block_size):
            stop = min(start + self.block_size, total)
            rows = torch.arange(start, stop, device=call.key.device)
            visible = visible_slots(rows, slots, real=real, sliding_window=sliding_window)
            probs = attention_rows(call.query[:, :, start - past : stop - past], call.key, visible,
                                   scaling=call.scaling)
            self._store_rows(call.layer, prompt, *to_prompt_positions(probs, slots, prompt_length))

    def _store_rows(self, layer: int, prompt: _Prompt, prompt_rows: torch.Tensor, mass: torch.Tensor) -> None:
        rows = prompt.rows.get(layer)
        if rows is None:
            shape = (prompt.batch, self.num_heads, prompt.width)
            capacity = min(max(prompt.planned_rows, 1), max(prompt.max_rows, 1))
            rows = prompt.rows[layer] = _Rows(self.reducer, shape, capacity, self.reduce_window, self.top_k,
                                              max_rows=max(prompt.max_rows, 1))
        rows.append(prompt_rows.cpu(), mass.cpu())

    def _note_kept(self, call: AttentionCall, prompt: _Prompt) -> None:
        if call.slot_positions is None:
            return
        positions = call.slot_positions
        held = int((positions[0, 0] < prompt.width).sum())
        prompt.kept[call.layer] = positions[..., :held].detach().cpu().clone()

    # -- memory guard --------------------------------------------------------------------------------
    def _planned_rows(self, prompt_width: int) -> int:
        if not self.generation:
            return 0
        if self.teacher_forced_prompt_length is not None:
            return max(prompt_width - self.teacher_forced_prompt_length, 0)
        new_tokens = self.max_new_tokens
        config = getattr(self.model, "generation_config", None)
        if new_tokens is None and config is not None:
            new_tokens = config.max_new_tokens
            if new_tokens is None and config.max_length is not None:
                new_tokens = max(config.max_length - prompt_width, 0)
        return max((new_tokens or 0) - 1, 0)  # generate never feeds its last token back

    def _estimate(self, batch: int, prompt_width: int, rows: int) -> dict[str, int]:
        return estimate_trace_bytes(
            layers=self.num_layers, heads=self.num_heads, batch=batch, prompt_length=prompt_width,
            window_size=self.window_size, generated=rows, reducer=self.reducer, reduce_window=self.reduce_window,
            top_k=self.top_k,
        )

    def _held_bytes(self) -> int:
        return sum(sum(t.numel() * t.element_size() for t in trace.tensors.values()) for trace in self.traces)

    def _check_prompt_budget(self, prompt: _Prompt, tokens: int) -> None:
        """Refuse a prompt whose trace would exceed max_bytes (tokens: input tokens so far)."""
        width = tokens if self.teacher_forced_prompt_length is None else self.teacher_forced_prompt_length
        rows = self._planned_rows(tokens)
        parts = self._estimate(prompt.batch, width, rows)
        held = self._held_bytes()
        if parts["total"] + held > self.max_bytes:
            earlier = f" + {_gib(held)} held by {len(self.traces)} earlier trace(s)" if held else ""
            raise ValueError(
                f"recording this prompt needs about {_gib(parts['total'])}{earlier}, over max_bytes="
                f"{_gib(self.max_bytes)}: observation window {_gib(parts['observation'])} (window_size="
                f"{self.window_size} x prompt {width} x {self.num_layers} layers x {self.num_heads} heads x "
                f"batch {prompt.batch}), generated rows {_gib(parts['generation'])} ({rows} rows, reducer="
                f"{self.reducer!r}). Lower it with a smaller window_size, generation=False, reducer='window_sum' "
                "or 'topk', fewer new tokens (max_new_tokens=), a shorter prompt or smaller batch, or raise max_bytes"
            )
        prompt.planned_rows = rows
        prompt.max_rows = self._max_rows(prompt.batch, width, self.max_bytes - held)

    def _max_rows(self, batch: int, width: int, budget: int) -> int:
        """The most generated rows whose trace fits in `budget` bytes."""
        low, high = 0, 1
        while self._estimate(batch, width, high)["total"] <= budget and high < 2**40:
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self._estimate(batch, width, middle)["total"] <= budget else (low, middle)
        return low

    def _check_step_budget(self, prompt: _Prompt) -> None:
        if prompt.steps + 1 <= prompt.max_rows:
            return
        need = self._estimate(prompt.batch, prompt.width, prompt.steps + 1)["total"] + self._held_bytes()
        raise ValueError(
            f"recording generated token {prompt.steps + 1} would take the trace to {_gib(need)}, over "
            f"max_bytes={_gib(self.max_bytes)}. Pass max_new_tokens= to snapkv.record so that the budget is "
            "checked before generation starts; lower it with reducer='window_sum' or 'topk', generation=False, "
            "a smaller window_size, fewer new tokens, or raise max_bytes"
        )

    # -- trace ---------------------------------------------------------------------------------------
    def _build_trace(self, prompt: _Prompt, final: bool) -> Trace:
        width = prompt.width
        tensors: dict[str, torch.Tensor] = {}
        layers = sorted(prompt.observation)
        for layer in layers:
            tensors[f"observation.{layer}"] = prompt.observation[layer]
            if self.generation:
                rows = prompt.rows.get(layer)
                if rows is None:
                    rows = _Rows(self.reducer, (prompt.batch, self.num_heads, width), 1, self.reduce_window,
                                 self.top_k)
                for name, tensor in rows.tensors(final).items():
                    tensors[f"{name}.{layer}"] = tensor
            if layer in prompt.kept:
                tensors[f"kept_positions.{layer}"] = prompt.kept[layer]
        generated = next(iter(prompt.rows.values())).count if prompt.rows else 0
        if self.reducer == "window_sum" and self.generation:
            windows = math.ceil(generated / self.reduce_window)
            counts = [min(self.reduce_window, generated - i * self.reduce_window) for i in range(windows)]
            tensors["window_token_counts"] = torch.tensor(counts, dtype=torch.long)
        ids = torch.cat(prompt.ids, dim=1) if prompt.ids else None
        if ids is not None:
            tensors["input_ids"] = ids
        if prompt.real is not None:
            mask = prompt.real[:, :width].long().cpu()
        else:
            mask = torch.ones(prompt.batch, width, dtype=torch.long)
        tensors["attention_mask"] = mask
        text = None
        if self.tokenizer is not None and ids is not None:
            pads = (width - mask.sum(-1)).tolist()
            text = [self.tokenizer.decode(row[pad:].tolist()) for row, pad in zip(ids, pads)]
        mode = "teacher_forced" if self.teacher_forced_prompt_length is not None else (
            "generate" if prompt.complete else "forward")
        metadata = environment(self.model) | {
            "format_version": FORMAT_VERSION,
            "mode": mode,
            "tokenizer": getattr(self.tokenizer, "name_or_path", None) if self.tokenizer is not None else None,
            "window_size": self.window_size,
            "generation": self.generation,
            "reducer": self.reducer,
            "reduce_window": self.reduce_window if self.reducer == "window_sum" else None,
            "top_k": self.top_k if self.reducer == "topk" else None,
            "policy": prompt.policy,
            "batch": prompt.batch,
            "prompt_length": width,
            "generated": generated,
            "layers": layers,
            "sliding_layers": sorted(prompt.sliding),
            "compressed_layers": sorted(prompt.kept),
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "text": text,
            "tensor_names": sorted(tensors),
        }
        return Trace(tensors, metadata)


def _active_policy() -> str | None:
    sessions = [tap for tap in ACTIVE_TAPS.get() if isinstance(tap, CompressionSession)]
    return repr(sessions[-1].policy) if sessions else None


def _check_settings(*, window_size, generation, max_bytes, reducer, reduce_window, top_k, max_new_tokens) -> None:
    for name, value in (("window_size", window_size), ("max_bytes", max_bytes), ("reduce_window", reduce_window),
                        ("top_k", top_k), ("max_new_tokens", max_new_tokens)):
        if value is not None or name != "max_new_tokens":
            check_int(name, value, 1)
    if not isinstance(generation, bool):
        raise TypeError(f"generation must be True or False, got {generation!r}")
    if reducer not in REDUCERS:
        raise ValueError(f"reducer must be one of {REDUCERS}, got {reducer!r}")


# -- public entry points -----------------------------------------------------------------------------
@contextlib.contextmanager
def record(model, window_size: int = SnapKV.window_size, generation: bool = True, max_bytes: int = 4 * 2**30,
           reducer: str = "raw", *, reduce_window: int = 128, top_k: int = 32, max_new_tokens: int | None = None,
           tokenizer=None, prefill_chunk_size: int | None = None):
    """Record what every attention head looks at while the block runs (`generate` or forward calls).

    window_size: observation window (last prompt tokens) whose attention over the prompt is kept.
    generation: also keep one row per decoding step (each generated token's attention over the prompt).
    max_bytes: refuse, before any model work, a prompt whose trace would exceed this many bytes.
    reducer: "raw" keeps every generated row; "window_sum" only their sums over windows of `reduce_window`
        rows; "topk" only the `top_k` largest positions and values of each row.
    max_new_tokens: the number of tokens `generate` will produce, for the memory check before prefill
        (default: the model's generation_config); the check is repeated at every decoding step anyway.
    tokenizer: decodes `trace.text` and is named in the metadata.
    prefill_chunk_size: prefill `generate` prompts in chunks of this many tokens (as `snapkv.compress` does;
        pass it here rather than to `generate`, whose own chunks may end on a single token, which looks like
        a decoding step).
    Yields a `Recorder`: `rec.trace` (the latest prompt), `rec.traces` (every prompt of the block).
    """
    if prefill_chunk_size is not None:
        check_int("prefill_chunk_size", prefill_chunk_size, 2)
    recorder = Recorder(model, window_size=window_size, generation=generation, max_bytes=max_bytes,
                        reducer=reducer, reduce_window=reduce_window, top_k=top_k, max_new_tokens=max_new_tokens,
                        tokenizer=tokenizer)
    try:
        with attach(model, recorder, prefill_chunk_size=prefill_chunk_size):
            yield recorder
    finally:
        recorder.finish()


def record_teacher_forced(model, prompt_ids, response_ids, window_size: int = SnapKV.window_size, *,
                          attention_mask=None, generation: bool = True, max_bytes: int = 4 * 2**30,
                          reducer: str = "raw", reduce_window: int = 128, top_k: int = 32, tokenizer=None,
                          block_size: int = 64, cache=None) -> Trace:
    """One forward over prompt + response; the response tokens' rows are recorded as if generated.

    prompt_ids (batch, P) or (P,), left-padded with `attention_mask` (batch, P); response_ids (batch, R) or
    (R,). Row i of `generation_attention` is response token i's attention over the prompt (evicting nothing),
    and `generated_mass` its attention on response tokens 0..i. Rows are computed `block_size` at a time.
    This is how the paper's observation code reads reference answers (teacher forcing).
    cache: a plain cache (`compat.new_cache` + `compat.prefill`) that already holds the first C prompt tokens,
    e.g. a document shared by several questions; only the rest runs, on a copy (the cache is left as it was).
    The observation window must lie after those C tokens. The trace equals the one of a whole forward up to
    float rounding (the prefix's keys come from a forward of another length).
    """
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    response_ids = torch.as_tensor(response_ids, dtype=torch.long)
    prompt_ids = prompt_ids[None] if prompt_ids.dim() == 1 else prompt_ids
    response_ids = response_ids[None] if response_ids.dim() == 1 else response_ids
    if prompt_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} rows but response_ids has {response_ids.shape[0]}")
    check_int("block_size", block_size, 1)
    prompt_length = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.ones_like(ids)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, dtype=torch.long).reshape(prompt_ids.shape)
        mask[:, :prompt_length] = attention_mask
    cached = 0 if cache is None else cache.get_seq_length()
    if cached > prompt_length - min(window_size, prompt_length):
        raise ValueError(f"the cache holds {cached} tokens, but the observation window (the last {window_size} of "
                         f"{prompt_length} prompt tokens) must come after them: prefill fewer tokens into it")
    device = next(model.parameters()).device
    recorder = Recorder(model, window_size=window_size, generation=generation, max_bytes=max_bytes,
                        reducer=reducer, reduce_window=reduce_window, top_k=top_k, tokenizer=tokenizer,
                        teacher_forced_prompt_length=prompt_length, prefix_ids=ids[:, :cached] if cached else None)
    recorder.block_size = block_size
    # logits_to_keep=1: nothing here reads the logits, and the vocabulary projection of every position
    # would cost a sixth of the forward on SmolLM2 and more than half on Gemma 3 (262K-token vocabulary)
    with torch.no_grad(), attach(model, recorder):
        if cached:
            compat.forward(model, ids[:, cached:].to(device), compat.copy_cache(cache),
                           attention_mask=mask.to(device), logits_to_keep=1)
        else:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
    recorder.finish()
    return recorder.traces[-1]
