"""KVzip (Kim et al., 2025, arXiv 2505.23416; kvpress's `KVzipPress`): query-agnostic scores from reconstructing
the context.

With the context's whole KV cache in place, the model is fed "repeat the previous context" followed by the context
itself (teacher-forced, in chunks of `chunk_size` tokens); a context position scores the largest attention it
receives from any reconstruction query of any query head of its GQA group. What the model needs to reproduce the
context is what a later question may need.

How it runs in the engine. The score needs the whole context cached, so KVzip applies where a context is
compressed as a whole: `snapkv.pack`, and the end of a prompt in `snapkv.compress` (one forward, in chunks with
`prefill_chunk_size`, or `session.compress_before_next_forward()`), and a `CompressionSession.fork` of an observer
that recorded the prompt's ids. The session does not compress layer by layer during the prompt's forward: at the
end of it (or, when the prompt came in chunks, at the start of the forward that compresses it: the first decoding
step, or the forward after `compress_before_next_forward()`, or `compress_now`) it runs the reconstruction forwards
(`reconstruction_scores`) through the model's decoder, on a view of the cache (one row at a time, cut from the
session's cache without copying it; each forward extends that view only, and each layer's extension is dropped as
soon as its attention has run), with the scoring tap as the only active tap: other taps (`snapkv.record`) and the
model's forward hooks never see these forwards. The cache itself is never changed by the scoring, so the compressed
decoding equals the masked full-cache decoding like every other policy's. Then every layer is compressed with its
scores (`PrefillView.reconstruction`). The reconstruction costs about one more prefill with twice the attention
(2.5x the plain pack's time for SmolLM2-135M on a 637-token context, on CPU), as kvpress warns.

Shared scores. The scores depend only on the model, the prompt's cached tokens and the fields that
`KVzip.reconstruction_key` lists (the repeat prompt's ids, chunk_size, overlap, sink_size), not on the budget, the
window, share_heads or a wrapper (SpanKeeping, BoundaryProtection delegate `reconstruct`): a session keeps the scores
it computed, by that key and by the prompt (its ids and padding, i.e. the tokens the cache holds), and a
`CompressionSession.fork` shares its observer's store (see `snapkv.core.compress`). Forks of one observer (one
prefill, each fork on its own `compat.copy_cache`, the same tokens) then run the reconstruction once per prompt state
(once after the context, once after context + question) for every budget and wrapper of one KVzip setting; the scores
are the same tensors as each fork's own run would give (the computation is deterministic), read only.

It cannot apply where the whole prompt's cache and ids are not both at hand, and says so: a prompt given as
`inputs_embeds`, a fork of an observer built without KVzip among its policies, a policy built without its
tokenized repeat prompt. Recorded traces hold only the window's attention, so the explorer cannot recompute KVzip's
choice (a trace recorded under it shows its kept positions as "recorded").

Like kvpress: the prompt texts ("\\n\\nRepeat the previous context exactly." then, for later chunks,
"\\n\\nRepeat the part of the previous context exactly, starting with" + the previous chunk's last 8 tokens), the
chat template's end of a user turn and start of the answer after them ("\\n" without a template), chunks of 2048
context tokens, the softmax over the attention sinks (the first 4 context tokens, for chunks after the first), the
chunk's own cached keys and the reconstruction's keys (causal), the max over the group's query heads and over every
reconstruction query (prompt included), and the 4 sink tokens always kept.

Where it differs, and why:
  budget     per layer, as every policy here: a layer keeps max_capacity_prompt positions per kv head on average,
             its heads sharing them (`share_heads=True`, the default: kvpress's `layerwise=True`, a ragged cache as
             AdaKV's), or each head keeping exactly max_capacity_prompt (`share_heads=False`). kvpress's default
             (`layerwise=False`) ranks every head of every layer together, so layers keep different numbers: the
             engine's budgets are per layer, fixed before the scores exist. On SmolLM2-135M (a 637-token context
             with a 7-digit passcode, 25% kept, the same scores) both kvpress allocations answer and per-head
             budgets do not. The last `window_size` positions are kept too, as by every windowed method here
             (default 0, as kvpress).
  prefix     the whole context is reconstructed: kvpress skips the chat template's prefix of the context (and
             scores it 0 but for the sinks); a pack's context ids carry no marker of where a template ends.
  sinks      the first `sink_size` real tokens are always kept (score 1.0, the largest attention). kvpress sets the
             same 1.0 but overwrites it when the template prefix is shorter than the sinks.
  precision  scores are computed in float32 whatever the model's dtype (kvpress: in the model's dtype), with the
             layer's own softmax scale (kvpress: 1/sqrt(head_dim), which is Llama's and Qwen's scale too).
  padding    a left-padded batch is scored row by row on its real tokens (kvpress: batch size 1 only).
  models     kvpress refuses Gemma 3; here its sliding-window layers run the reconstruction as usual and, as for
             every policy, are never compressed.
  not here   KVzip+ normalisation (`kvzip_plus_normalization`), which kvpress leaves off by default.
"""

import contextlib
import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from snapkv.core import compat
from snapkv.core.hook import ACTIVE_TAPS, ATTN_IMPLEMENTATION, AttentionCall, Tap, check_kernel, using_kernel
from snapkv.core.policies import PrefillView, ScoredPolicy, check_int
from snapkv.core.selection import adaptive_positions

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
PLAIN_SUFFIX = "\n"  # after the prompt when the tokenizer has no chat template
SCORE_BLOCK_ELEMENTS = 2**24  # attention logits computed at once by the scorer (64 MiB of float32)


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(int(i) for i in tokenizer(text, add_special_tokens=False).input_ids)


def _template_suffix(tokenizer) -> str:
    """What the chat template puts after a user message's content (end of turn, start of the answer), found as
    kvpress finds it: a dummy message with a separator, split on that separator."""
    if getattr(tokenizer, "chat_template", None) is None:
        return PLAIN_SUFFIX
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    messages = [{"role": "user", "content": dummy + separator}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             enable_thinking=False)
    except TypeError:  # a template function without the keyword
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text.split(separator)[-1]


def repeat_prompt_ids(tokenizer) -> dict[str, tuple[int, ...]]:
    """{"prompt_ids", "continue_ids", "suffix_ids"}: kvpress's repeat prompts and the template's suffix, tokenized
    without special tokens (the fields of `KVzip` that `KVzip.for_tokenizer` fills)."""
    return {"prompt_ids": _ids(tokenizer, REPEAT_PROMPT), "continue_ids": _ids(tokenizer, CONTINUE_PROMPT),
            "suffix_ids": _ids(tokenizer, _template_suffix(tokenizer))}


@dataclass(frozen=True)
class KVzip(ScoredPolicy):
    """KVzip: a context position scores the largest attention it gets while the model reconstructs the context
    (see `snapkv.core.kvzip`). Build it with `KVzip.for_tokenizer(tokenizer, max_capacity_prompt=...)`, which
    tokenizes the repeat prompt.

    prompt_ids / continue_ids: the first / later chunks' repeat prompt; suffix_ids: the chat template's end of the
    user turn and start of the answer; chunk_size: context tokens reconstructed per forward; overlap: tokens of
    the previous chunk quoted in a later chunk's prompt; sink_size: first tokens always kept; share_heads: the
    heads of a layer share its budget (kvpress's layerwise=True), else each keeps max_capacity_prompt. The last
    `window_size` positions are kept too (default 0: kvpress keeps no window).
    """

    window_size: int = 0
    prompt_ids: tuple[int, ...] = field(default=(), repr=False)
    continue_ids: tuple[int, ...] = field(default=(), repr=False)
    suffix_ids: tuple[int, ...] = field(default=(), repr=False)
    chunk_size: int = 2048
    overlap: int = 8
    sink_size: int = 4
    share_heads: bool = True
    observes: ClassVar[frozenset[str]] = frozenset({"input_ids", "reconstruction"})

    def __post_init__(self):
        for name in ("prompt_ids", "continue_ids", "suffix_ids"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(isinstance(i, int) and i >= 0 for i in value):
                raise TypeError(f"{name} must be a tuple of token ids, got {value!r}: build the policy with "
                                "KVzip.for_tokenizer(tokenizer, ...)")
            object.__setattr__(self, name, tuple(value))
        super().__post_init__()
        check_int("chunk_size", self.chunk_size, 1)
        check_int("overlap", self.overlap, 0)
        check_int("sink_size", self.sink_size, 0)
        if not isinstance(self.share_heads, bool):
            raise TypeError(f"share_heads must be True or False, got {self.share_heads!r}")

    @property
    def per_head_slots(self) -> bool:
        """Heads sharing a layer's budget keep different numbers of positions (a ragged cache)."""
        return self.share_heads

    @classmethod
    def for_tokenizer(cls, tokenizer, **settings) -> "KVzip":
        """KVzip with its repeat prompt tokenized by `tokenizer` (with its chat template's turn markers when it
        has one, as kvpress does); `settings`: the other fields (max_capacity_prompt, window_size, ...)."""
        return cls(**repeat_prompt_ids(tokenizer), **settings)

    def check_ready(self) -> None:
        """Raise ValueError when the policy has no tokenized repeat prompt."""
        if not self.prompt_ids:
            raise ValueError("this KVzip has no repeat prompt to reconstruct the context with: build it with "
                             "KVzip.for_tokenizer(tokenizer, max_capacity_prompt=...) or "
                             "snapkv.method_policy('kvzip', budget, tokenizer=tokenizer)")

    @property
    def reconstruction_key(self) -> tuple:
        """What decides `reconstruct`'s scores besides the model and the prompt's cache (hashable): sessions share
        the scores of policies with the same key (other budgets, windows, share_heads, wrappers)."""
        return (type(self), self.prompt_ids, self.continue_ids, self.suffix_ids, self.chunk_size, self.overlap,
                self.sink_size)

    def reconstruct(self, model, cache, input_ids: torch.Tensor | None, padding_mask: torch.Tensor | None,
                    layers) -> dict[int, torch.Tensor]:
        """{layer: float32 (batch, kv_heads, n)} for `layers`, from `cache` holding the whole prompt `input_ids`
        (batch, n) (the session calls it: `reconstruction_scores`)."""
        return reconstruction_scores(model, cache, input_ids, padding_mask, self, layers)

    def select_from_scores(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """share_heads: the layer's heads share heads x (budget - window_size) slots, the highest scores of any head
        (kvpress's `layerwise=True`; AdaKV's allocation without its safeguard); else each head's top."""
        if self.share_heads:
            return adaptive_positions(scores, budget - self.window_size, self.window_size, 0.0)
        return super().select_from_scores(scores, budget)

    def score(self, view: PrefillView) -> torch.Tensor:
        if view.reconstruction is None:
            raise ValueError("KVzip scores a prompt by reconstructing it from its whole cache, which only a "
                             "compression session runs (snapkv.compress or snapkv.pack): this view has no "
                             "reconstruction scores")
        scores = view.reconstruction.float().clone()
        scores[..., : self.sink_size] = 1.0
        return scores


# -- the reconstruction ----------------------------------------------------------------------------------------
def reconstruction_chunks(context: list[int], policy: KVzip) -> list[tuple[int, int, list[int]]]:
    """(start, end, ids) per chunk of `context` (kvpress's `prepare`): ids = the repeat prompt (later chunks: the
    continuation prompt and the previous chunk's last `overlap` tokens), the template's suffix, then the chunk
    context[start:end]."""
    chunks = []
    for start in range(0, len(context), policy.chunk_size):
        end = min(start + policy.chunk_size, len(context))
        if start == 0:
            prompt = list(policy.prompt_ids)
        else:
            prompt = list(policy.continue_ids) + context[max(start - policy.overlap, 0) : start]
        chunks.append((start, end, prompt + list(policy.suffix_ids) + context[start:end]))
    return chunks


def chunk_attention_scores(query: torch.Tensor, keys: torch.Tensor, context_slots: torch.Tensor, chunk: int, *,
                           scaling: float) -> torch.Tensor:
    """The largest attention each of a chunk's context keys gets from the reconstruction queries.

    query (batch, heads, q, head_dim): the reconstruction's queries (post-RoPE); keys (batch, kv_heads, slots,
    head_dim): the cache after the reconstruction forward's update, its last q slots the reconstruction's own keys;
    context_slots (c,): the slots of the sink keys then of the chunk's `chunk` context keys. The softmax runs over
    those c keys and the q reconstruction keys (causal among them), as kvpress's `score_kvzip`.
    Returns float32 (batch, kv_heads, chunk): the max over the group's query heads and over the q queries.
    """
    batch, heads, q, head_dim = query.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    c = context_slots.numel()
    chosen = torch.cat([keys.index_select(2, context_slots), keys[:, :, -q:]], dim=2).float()
    chosen_t = chosen.transpose(2, 3)
    block = max(1, SCORE_BLOCK_ELEMENTS // max(heads * (c + q), 1))
    best = None
    columns = torch.arange(q, device=keys.device)
    for first in range(0, q, block):
        rows = min(block, q - first)
        grouped = query[:, :, first : first + rows].float().reshape(batch, kv_heads, groups * rows, head_dim)
        logits = torch.matmul(grouped * scaling, chosen_t).view(batch, kv_heads, groups, rows, c + q)
        hidden = columns[None, :] > torch.arange(first, first + rows, device=keys.device)[:, None]  # (rows, q)
        logits[..., c:].masked_fill_(hidden, float("-inf"))
        top = torch.softmax(logits, dim=-1)[..., c - chunk : c].amax(dim=(2, 3))
        best = top if best is None else torch.maximum(best, top)
    return best


class _Scorer(Tap):
    """The only active tap during a reconstruction forward: scores each scored layer's chunk, then drops the
    layer's extension from the row's cache view (the layer is not read again in that forward)."""

    user, effect = "KVzip's reconstruction", "nothing was scored"

    def __init__(self, view, source, row: int, layers, scores: dict[int, torch.Tensor]):
        self.view, self.source, self.row, self.layers, self.scores = view, source, row, set(layers), scores
        self.context_slots = None
        self.first = self.end = 0  # cache slots of the chunk's context keys

    def after_attention(self, call: AttentionCall) -> None:
        if call.layer in self.layers and not call.sliding:
            chunk = self.end - self.first
            scores = chunk_attention_scores(call.query, call.key, self.context_slots, chunk, scaling=call.scaling)
            self.scores[call.layer][self.row, :, self.first : self.end] = scores[0].to(self.scores[call.layer].device)
        self.view.layers[call.layer] = _row_layer(self.source.layers[call.layer], self.row)


def _row_layer(layer, row: int):
    """A shallow copy of a cache layer holding one row of it (views, no copy): updating it leaves `layer` as it is."""
    copied = copy.copy(layer)
    if getattr(layer, "is_initialized", False) and layer.keys is not None:
        copied.keys, copied.values = layer.keys[row : row + 1], layer.values[row : row + 1]
    return copied


def _row_view(cache, row: int):
    view = copy.copy(cache)
    view.layers = [_row_layer(layer, row) for layer in cache.layers]
    return view


@contextlib.contextmanager
def _only(model, tap: Tap):
    """`tap` is the only tap the attention hook shows calls to while the block runs (the hook is installed if it
    is not already)."""
    token = ACTIVE_TAPS.set((tap,))
    previous = compat.attention_implementation(model)
    try:
        if previous == ATTN_IMPLEMENTATION:
            yield
        else:
            with using_kernel(model, check_kernel(previous)):
                compat.set_attention_implementation(model, ATTN_IMPLEMENTATION)
                try:
                    yield
                finally:
                    compat.set_attention_implementation(model, previous)
    finally:
        ACTIVE_TAPS.reset(token)


def reconstruction_scores(model, cache, input_ids: torch.Tensor | None, padding_mask: torch.Tensor | None,
                          policy: KVzip, layers) -> dict[int, torch.Tensor]:
    """{layer: float32 (batch, kv_heads, n)}: KVzip's score of every cached prompt position of `layers`, 0 at padding.

    cache: holds the whole prompt `input_ids` (batch, n), left-padded where `padding_mask` (batch, n) is False;
    it is read, never changed. Each row is reconstructed on its own real tokens, in chunks (`reconstruction_chunks`),
    each chunk one forward of the model's decoder on a view of the row's cache, under `torch.no_grad`.
    """
    policy.check_ready()
    if input_ids is None:
        raise ValueError("KVzip reconstructs the prompt from its token ids, but the prompt came without input_ids "
                         "(inputs_embeds?): give the prompt as input_ids")
    layers = sorted(layers)
    batch, n = input_ids.shape
    config = model.config.get_text_config()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    device = input_ids.device
    scores = {layer: torch.zeros(batch, kv_heads, n, dtype=torch.float32, device=device) for layer in layers}
    if not layers:
        return scores
    decoder = model.get_decoder()
    keyword = compat.cache_keyword(decoder)
    for row in range(batch):
        real = torch.ones(n, dtype=torch.bool, device=device) if padding_mask is None else padding_mask[row].bool()
        length = int(real.sum())
        pad = n - length  # left padding: real token p sits in slot pad + p
        context = input_ids[row, pad:].tolist()
        view = _row_view(cache, row)
        scorer = _Scorer(view, cache, row, layers, scores)
        for start, end, ids in reconstruction_chunks(context, policy):
            sinks = torch.arange(min(policy.sink_size, start), device=device)
            scorer.context_slots = torch.cat([sinks, torch.arange(start, end, device=device)]) + pad
            scorer.first, scorer.end = pad + start, pad + end
            ids = torch.tensor([ids], dtype=torch.long, device=device)
            kwargs = {}
            if pad:
                kwargs["attention_mask"] = torch.cat([real[None].long(), torch.ones_like(ids)], dim=1)
                kwargs["position_ids"] = torch.arange(length, length + ids.shape[1], device=device)[None]
            with torch.no_grad(), _only(model, scorer):
                decoder(input_ids=ids, use_cache=True, **{keyword: view}, **kwargs)
    return scores
