"""KV packs: compress a document once, save it, ask it many questions, exactly.

`snapkv.pack(model, context_ids, policy)` prefills a context once and keeps its KV cache: the full cache (policy
None or `FullCache()`), or the cache compressed by `policy` at the end of the context, before any question is
seen (question-agnostic: the observation window is the context's last tokens). `pack.generate(question_ids, ...)`
continues from a copy of that cache, so the pack never changes, and equals

  full cache   `model.generate(torch.cat([context_ids, question_ids], 1), ...)` (the context is not recomputed;
               rotary positions continue from the context's length)
  a policy     the same call inside `snapkv.compress(model, policy)` on a cache whose context was prefilled in the
               session and compressed at its end (`session.compress_before_next_forward()`)

On disk a pack is a folder, written atomically (a temporary folder renamed into place):
  tensors.safetensors   layers.{i}.{name}: every cache layer's tensors (keys, values; `positions`, the kept prompt
                        positions of a compressed layer)
  metadata.json         format version, model identity (config, a weights fingerprint), tokenizer, dtype, policy,
                        context length and ids, how each layer is rebuilt, environment (torch/transformers versions)
`KVPack.load(path, model)` refuses another model, dtype or format version and a truncated file, naming what is wrong.
A compressed layer class saves itself (`state()` / `from_state()`, e.g. `CompressedLayer`); transformers' own
layers go through `compat.layer_state` / `compat.restore_layer`.
"""

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from snapkv.core import compat
from snapkv.core.cache import CompressedLayer
from snapkv.core.compress import attach, compress
from snapkv.core.environment import environment, weights_fingerprint
from snapkv.core.hook import AttentionCall, Tap, check_left_padding
from snapkv.core.policies import FullCache, Policy, check_int
from snapkv.core.trace import METADATA_FILE, TENSORS_FILE, write_folder

FORMAT_VERSION = 1
KIND = "snapkv.KVPack"
# the config fields that decide what a cache means; the weights fingerprint covers everything else
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_parameters",
                       "rope_scaling", "sliding_window", "layer_types")


# -- identity of what made a pack -----------------------------------------------------------------------------
def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


def model_identity(model) -> dict:
    """The model's label, its architecture (`ARCHITECTURE_FIELDS` of its text config), whole config and weights
    fingerprint."""
    config = model.config.get_text_config()
    return {
        "model_id": compat.model_label(model),
        "architecture": _json_safe({field: getattr(config, field, None) for field in ARCHITECTURE_FIELDS}),
        "weights_fingerprint": weights_fingerprint(model),
        "config": _json_safe(config.to_dict()),
    }


def tokenizer_identity(tokenizer) -> dict:
    """The tokenizer's name, vocabulary size and a sha256 of its vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {"name": getattr(tokenizer, "name_or_path", None), "vocab_size": len(vocab),
            "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()}


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def check_same_model(metadata: dict, model, tokenizer=None, where: str = "this pack") -> None:
    """Raise ValueError, naming the mismatch and the fix, when `model` (and `tokenizer`, when both the pack and
    the call have one) is not what made a pack: its dtype, architecture, weights or vocabulary differ."""
    packed = metadata["model"]
    dtype = _dtype_name(model)
    if metadata["dtype"] != dtype:
        raise ValueError(f"{where} holds {metadata['dtype']} keys and values but the model runs in {dtype}: load the "
                         f"model with dtype={metadata['dtype']!r}, or pack the context again in {dtype}")
    current = model_identity(model)
    saved, mine = packed["architecture"], current["architecture"]
    differences = [f"{field} (pack: {saved.get(field)!r}, model: {mine[field]!r})"
                   for field in ARCHITECTURE_FIELDS if saved.get(field) != mine[field]]
    if differences:
        raise ValueError(f"{where} was packed with another model ({packed['model_id']!r}; this one is "
                         f"{current['model_id']!r}): its config differs in {', '.join(differences)}. Load the model "
                         "it was packed with, or pack the context again with this one")
    if packed["weights_fingerprint"] != current["weights_fingerprint"]:
        raise ValueError(f"{where} was packed with a model of the same architecture but other weights "
                         f"({packed['model_id']!r}, weights fingerprint {packed['weights_fingerprint'][:12]}; this "
                         f"model {current['model_id']!r}: {current['weights_fingerprint'][:12]}). Load the model it "
                         "was packed with, or pack the context again with this one")
    saved = metadata.get("tokenizer")
    if tokenizer is not None and saved is not None and tokenizer_identity(tokenizer) != saved:
        mine = tokenizer_identity(tokenizer)
        raise ValueError(f"{where} was packed with another tokenizer ({saved['name']!r}, {saved['vocab_size']} "
                         f"tokens; this one: {mine['name']!r}, {mine['vocab_size']} tokens): its ids would mean "
                         "other text. Use the tokenizer it was packed with")


def policy_record(policy: Policy) -> dict:
    """{"name": the policy's class, "settings": its fields}: what `policy_from_record` rebuilds it from. A field
    that is a policy (what BoundaryProtection and SpanKeeping wrap) is written as its own record."""
    settings = {}
    for item in dataclasses.fields(policy):
        value = getattr(policy, item.name)
        settings[item.name] = policy_record(value) if isinstance(value, Policy) else value
    return {"name": type(policy).__name__, "settings": _json_safe(settings)}


def _subclasses(cls) -> dict[str, type]:
    """`cls` and every subclass of it, by name."""
    found, todo = {}, [cls]
    while todo:
        current = todo.pop()
        found[current.__name__] = current
        todo += current.__subclasses__()
    return found


def policy_from_record(record: dict) -> Policy:
    """The policy `policy_record` wrote (lists become tuples, as the policies' per-layer budgets are)."""
    known = _subclasses(Policy)
    if record["name"] not in known:
        raise ValueError(f"this pack was made with the policy {record['name']!r}, which this snapkv does not know: "
                         "use the snapkv version that made it")
    return known[record["name"]](**{name: _setting(value) for name, value in record["settings"].items()})


def _setting(value):
    """A policy field as `policy_record` wrote it -> its value: a nested record is a policy, a list a tuple."""
    if isinstance(value, dict) and set(value) == {"name", "settings"}:
        return policy_from_record(value)
    return tuple(value) if isinstance(value, list) else value


# -- cache layers -------------------------------------------------------------------------------------------
def layer_state(layer) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(kind, tensors, settings) of one cache layer: a compressed layer's own `state()`, or a transformers layer's
    through `compat.layer_state`; kind is the layer's class name."""
    kind = type(layer)
    if isinstance(layer, CompressedLayer) and not {"state", "from_state"} <= set(vars(kind)):
        raise TypeError(f"{kind.__name__} defines no state() and from_state() of its own, so a pack cannot save it "
                        f"(the ones it inherits would describe a {kind.__mro__[1].__name__}): add them to the class")
    tensors, settings = layer.state() if isinstance(layer, CompressedLayer) else compat.layer_state(layer)
    return kind.__name__, tensors, settings


def restore_layer(empty, kind: str, tensors: dict[str, torch.Tensor], settings: dict):
    """The layer `layer_state` described, given the empty layer a new cache of the model has at that index."""
    compressed = _subclasses(CompressedLayer)
    if kind in compressed:
        return compressed[kind].from_state(tensors, settings)
    if type(empty).__name__ != kind:
        raise ValueError(f"the pack holds a {kind} where this model's cache has a {type(empty).__name__}: it was "
                         "packed with another model or transformers version; pack the context again")
    compat.restore_layer(empty, tensors, settings)
    return empty


# -- making a pack ------------------------------------------------------------------------------------------
class _LastCalls(Tap):
    """Keeps each layer's last attention call of a prefill, as a call of no new tokens (an empty query, no mask):
    what a forward of zero tokens would show the taps."""

    user, effect = "snapkv.pack", "nothing was packed"

    def __init__(self):
        self.calls: dict[int, AttentionCall] = {}

    def after_attention(self, call: AttentionCall) -> None:
        batch, heads, _, head_dim = call.query.shape
        self.calls[call.layer] = call.with_kv(query=call.query.new_empty(batch, heads, 0, head_dim), mask=None,
                                              past_length=call.key.shape[-2])


def _check_ids(name: str, ids, *, one_row: bool = False) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor (batch, tokens), got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be integer token ids of shape (batch, tokens), got {ids.dtype} of shape "
                         f"{tuple(ids.shape)}")
    if one_row and ids.shape[0] != 1:
        raise ValueError(f"{name} must hold one context, shape (1, tokens), got {tuple(ids.shape)}: pack each "
                         "context on its own")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty: give at least one token")
    return ids.long()


def pack(model, context_ids: torch.Tensor, policy: Policy | None = None, *, tokenizer=None,
         prefill_chunk_size: int | None = None) -> "KVPack":
    """Prefill `context_ids` (1, n) once and keep its KV cache, to ask many questions of (`KVPack.generate`).

    policy: None or `FullCache()` keeps the full cache; any other policy compresses it at the end of the context,
        before a question is seen (its observation window is the context's last `window_size` tokens).
    tokenizer: recorded with the pack (name and vocabulary), so that `KVPack.load` can refuse another one.
    prefill_chunk_size: prefill in chunks of this many tokens (None: one forward), exactly as `compat.prefill`.
    """
    policy = FullCache() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be None or a snapkv policy (SnapKV(), FullCache(), ...), got "
                        f"{type(policy).__name__}")
    policy.check_model(model.config.get_text_config().num_hidden_layers)
    context_ids = _check_ids("context_ids", context_ids, one_row=True)
    n = context_ids.shape[1]
    if n < policy.window_size:
        raise ValueError(f"the context has {n} tokens but the policy's window_size is {policy.window_size}: use a "
                         "longer context or a smaller window_size")
    if prefill_chunk_size is not None and check_int("prefill_chunk_size", prefill_chunk_size, 2) < policy.window_size:
        raise ValueError(f"prefill_chunk_size ({prefill_chunk_size}) must be at least window_size "
                         f"({policy.window_size})")
    context_ids = context_ids.to(next(model.parameters()).device)
    cache = compat.new_cache(model)
    with torch.no_grad():
        if isinstance(policy, FullCache):
            compat.prefill(model, context_ids, cache, chunk_size=prefill_chunk_size)
        elif prefill_chunk_size is None:  # one forward: the session compresses each layer right after it
            with compress(model, policy):
                compat.prefill(model, context_ids, cache)
        else:  # in chunks: compress after the last one, as the session would at the next forward
            last = _LastCalls()
            with compress(model, policy, prefill_chunk_size=prefill_chunk_size) as session, attach(model, last):
                compat.prefill(model, context_ids, cache, chunk_size=prefill_chunk_size)
            session.compress_now(cache, last.calls)
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "model": model_identity(model),
        "tokenizer": None if tokenizer is None else tokenizer_identity(tokenizer),
        "dtype": _dtype_name(model),
        "policy": policy_record(policy),
        "context_length": n,
        "context_ids": context_ids[0].tolist(),
        "environment": environment(model),
    }
    return KVPack(model, cache, context_ids, policy, metadata)


# -- asking a pack ------------------------------------------------------------------------------------------
class _PackReader(Tap):
    """Reads a pack's compressed layers while `KVPack.generate` runs: each of their attention calls gets the
    layer's slot mask (kept prompt slots, then the question and answer, a left-padded question batch's padding
    hidden), logical length and slot positions, as in a compression session."""

    user, effect = "snapkv.KVPack.generate", "the pack's compressed layers were read without their mask"

    def __init__(self):
        self.cache = None
        self.padding = None

    def before_forward(self, module, args, kwargs) -> None:
        self.cache = compat.forward_cache(kwargs)
        mask = kwargs.get("attention_mask")
        self.padding = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not mask.all() else None

    def before_attention(self, call: AttentionCall) -> AttentionCall:
        layer = self.cache.layers[call.layer] if self.cache is not None else None
        if not isinstance(layer, CompressedLayer) or call.past_length == 0:
            return call
        slots = layer.slot_positions()
        mask = layer.attention_mask(call.query_length, call.query.shape[1])
        if self.padding is not None:  # the appended slots are the question and answer: hide their padding
            real = torch.ones(slots.shape[0], slots.shape[-1], dtype=torch.bool, device=slots.device)
            real[:, slots.shape[-1] - layer.appended:] = self.padding[:, -layer.appended:]
            mask = real[:, None, None, :] if mask is None else mask & real[:, None, None, :]
        return call.with_kv(mask=mask, past_length=layer.get_seq_length() - call.query_length, slot_positions=slots)


class KVPack:
    """A context's prefilled KV cache (full or compressed) and what made it; ask it with `generate`, write it with
    `save`, read it back with `KVPack.load`. Made by `snapkv.pack`.

    cache: the cache of the context alone (batch 1), never changed by `generate`; context_ids (1, n);
    policy: what compressed it (`FullCache()` for none); metadata: what `save` writes to metadata.json.
    """

    def __init__(self, model, cache, context_ids: torch.Tensor, policy: Policy, metadata: dict):
        self.model = model
        self.cache = cache
        self.context_ids = context_ids
        self.policy = policy
        self.metadata = metadata

    @property
    def context_length(self) -> int:
        return self.context_ids.shape[1]

    @property
    def compressed(self) -> bool:
        """Whether any layer holds a compressed prompt (a budget at least the context's length keeps it whole)."""
        return any(isinstance(layer, CompressedLayer) for layer in self.cache.layers)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the pack's cache layers hold (keys, values, kept positions): about what `save`
        writes, bar metadata."""
        return sum(value.numel() * value.element_size() for layer in self.cache.layers
                   for value in vars(layer).values() if isinstance(value, torch.Tensor))

    def __repr__(self) -> str:
        return (f"KVPack(model={self.metadata['model']['model_id']!r}, context_length={self.context_length}, "
                f"policy={self.policy!r}, {self.nbytes / 2**20:.1f} MiB)")

    def generate(self, question_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs):
        """`model.generate` on context + question, continuing from a copy of the pack: returns what `generate`
        returns for `torch.cat([context_ids, question_ids], 1)` (context, question and answer ids by default).

        question_ids: (batch, q) token ids; a batch shares the pack, each row asks its own question.
        attention_mask: (batch, q) for a left-padded question batch (tokenizer.padding_side = "left"); None: no
            padding. generate_kwargs: anything `model.generate` takes (max_new_tokens, do_sample, ...).
        """
        for name in ("cache", "past_key_values", "input_ids", "inputs_embeds"):
            if name in generate_kwargs:
                raise TypeError(f"KVPack.generate got {name}=...: the pack supplies the context and its cache; "
                                "pass only the question ids")
        question_ids = _check_ids("question_ids", question_ids).to(self.context_ids.device)
        batch = question_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(question_ids)
        elif tuple(attention_mask.shape) != tuple(question_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but question_ids "
                             f"{tuple(question_ids.shape)}: give one mask entry per question token")
        attention_mask = attention_mask.to(self.context_ids.device).long()
        check_left_padding(attention_mask, "KVPack.generate")
        if not attention_mask[:, -1].all():
            raise ValueError("a question of the batch is all padding: give every row at least one token")
        if not attention_mask.all() and any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise ValueError("this model has sliding-window layers, whose window counts the padding between the "
                             "context and a padded question: ask questions of different lengths one by one (or "
                             "batch questions of equal length)")
        ids = torch.cat([self.context_ids.expand(batch, -1), question_ids], dim=1)
        mask = torch.cat([torch.ones_like(self.context_ids).expand(batch, -1), attention_mask], dim=1)
        cache = compat.copy_cache(self.cache, batch_size=batch)
        reading = attach(self.model, _PackReader()) if self.compressed else contextlib.nullcontext()
        with reading:
            return compat.generate(self.model, ids, cache, attention_mask=mask, **generate_kwargs)

    # -- disk ----------------------------------------------------------------------------------------------
    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write `path/tensors.safetensors` and `path/metadata.json` (see the module docstring), atomically: a
        temporary folder next to `path` is renamed into place, so nothing half-written is ever left."""
        tensors, layers = {}, []
        for index, layer in enumerate(self.cache.layers):
            kind, state, settings = layer_state(layer)
            tensors |= {f"layers.{index}.{name}": tensor for name, tensor in state.items()}
            layers.append({"kind": kind, "tensors": sorted(state), "settings": settings})
        return write_folder(path, tensors, self.metadata | {"layers": layers}, FORMAT_VERSION, overwrite=overwrite)

    @classmethod
    def load(cls, path, model, tokenizer=None) -> "KVPack":
        """Read a pack written by `save`, for `model` (and `tokenizer`, checked when given).

        Raises FileNotFoundError for a missing folder or file, and ValueError for another format version, another
        model (config or weights), dtype or tokenizer, or a truncated or corrupt file, each naming the fix.
        """
        path = Path(path)
        metadata = read_metadata(path)
        check_same_model(metadata, model, tokenizer, where=str(path))
        tensors = read_tensors(path)
        device = next(model.parameters()).device
        cache = compat.new_cache(model)
        if len(metadata["layers"]) != len(cache.layers):
            raise ValueError(f"{path} holds {len(metadata['layers'])} cache layers but this model's cache has "
                             f"{len(cache.layers)}: pack the context again with this model")
        for index, entry in enumerate(metadata["layers"]):
            names = [f"layers.{index}.{name}" for name in entry["tensors"]]
            missing = [name for name in names if name not in tensors]
            if missing:
                raise ValueError(f"{path / TENSORS_FILE} lacks {missing[:3]}: the file is incomplete; save the pack "
                                 "again")
            state = {name: tensors[f"layers.{index}.{name}"].to(device) for name in entry["tensors"]}
            cache.layers[index] = restore_layer(cache.layers[index], entry["kind"], state, entry["settings"])
        context_ids = torch.tensor([metadata["context_ids"]], dtype=torch.long, device=device)
        metadata = {name: value for name, value in metadata.items() if name != "layers"}
        return cls(model, cache, context_ids, policy_from_record(metadata["policy"]), metadata)


# -- files --------------------------------------------------------------------------------------------------
def read_metadata(path: Path) -> dict:
    """metadata.json of a pack folder, checked to be a pack of this format version."""
    if not path.is_dir():
        raise FileNotFoundError(f"no KV pack folder at {path}")
    for name in (METADATA_FILE, TENSORS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a complete KV pack: {name} is missing")
    try:
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path / METADATA_FILE} is not valid JSON ({error}): the pack is truncated or corrupt; "
                         "save it again") from None
    if not isinstance(metadata, dict) or metadata.get("kind") != KIND:
        raise ValueError(f"{path} is not a KV pack (its metadata.json has no kind {KIND!r}): give a folder written "
                         "by KVPack.save or `snapkv pack`")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} holds a KV pack in format_version {version!r}, but this snapkv reads "
                         f"format_version {FORMAT_VERSION}: pack the context again with this version")
    return metadata


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / TENSORS_FILE))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path / TENSORS_FILE} cannot be read ({type(error).__name__}: {error}): the file is "
                         "truncated or corrupt; save the pack again") from None
