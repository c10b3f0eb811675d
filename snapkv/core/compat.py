"""Every call that depends on the transformers version (5.2 to the newest), in one file.

Nothing else in snapkv reads a private transformers attribute or knows which release renamed what:
  forward keywords    the cache argument is `cache` in newer releases, `past_key_values` before
  chunked prefill     one loop (`prefill`), and one pre-hook that runs a `generate` prompt in chunks
                      (`chunked_prefill_hook`): transformers' own chunking ends on a 1-token chunk for some
                      prompt lengths, which no forward can tell from a decoding step
  caches              `new_cache`, `copy_cache`, the query length passed to `get_mask_sizes`, what a stock
                      cache layer holds (`layer_state`, `restore_layer`: KV packs on disk)
  generate            `generate` continuing from a prefilled cache
  models              the attention implementation, the model's label, the GGUF loading workaround
"""

import copy
import inspect
import sys

import torch

from snapkv.core.policies import check_int


# -- forward calls ---------------------------------------------------------------------------------------
def cache_keyword(model) -> str:
    """The name of the forward's cache argument: `cache` (newer releases) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward_cache(kwargs: dict):
    """The cache a forward was given (under either name), or None."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if hasattr(cache, "layers") else None


def forward(model, ids: torch.Tensor, cache, **kwargs):
    """One forward of `ids` (batch, q) appended to `cache`."""
    return model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache}, **kwargs)


# -- chunked prefill -------------------------------------------------------------------------------------
def chunk_bounds(start: int, stop: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """[start, stop) cut into chunks of `chunk_size` (one chunk when None). A last chunk of a single token
    would be taken for a decoding step, so it borrows a token from the chunk before it."""
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 2)
    if stop <= start:
        return []
    size = chunk_size or stop - start
    bounds = [(begin, min(begin + size, stop)) for begin in range(start, stop, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        (a, b), (_, d) = bounds[-2], bounds[-1]
        bounds[-2:] = [(a, b - 1), (b - 1, d)]
    return bounds


def prefill(model, ids: torch.Tensor, cache, *, start: int = 0, chunk_size: int | None = None,
            logits_to_keep: int = 1) -> torch.Tensor:
    """Forward ids[:, start:] onto `cache` in chunks of `chunk_size` tokens (one forward when None); the last
    position's logits (batch, 1, vocab). logits_to_keep: passed to every forward (0 computes them all)."""
    logits = None
    for begin, end in chunk_bounds(start, ids.shape[-1], chunk_size):
        logits = forward(model, ids[:, begin:end], cache, logits_to_keep=logits_to_keep).logits
    if logits is None:
        raise ValueError(f"nothing to prefill: the cache already holds {start} of {ids.shape[-1]} tokens")
    return logits[:, -1:]


def chunked_prefill_hook(chunk_size: int):
    """A model forward pre-hook (register it with with_kwargs=True, prepend=True) that runs a `generate`
    prompt in chunks of `chunk_size` tokens, with `chunk_bounds`.

    It acts on a forward that starts an empty cache, keeps only the last position's logits (as `generate`
    asks) and has more than `chunk_size` tokens: it forwards every chunk but the last itself, then lets the
    forward run on the last chunk. Every other forward runs unchanged.
    """

    def hook(model, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        ids = kwargs.get("input_ids")
        inputs = ids if ids is not None else kwargs.get("inputs_embeds")
        cache = forward_cache(kwargs)
        if (inputs is None or inputs.shape[1] <= chunk_size or cache is None or cache.get_seq_length() > 0
                or kwargs.get("logits_to_keep") != 1):
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("prefill_chunk_size needs a 2-D attention_mask (batch, tokens): pass one, or "
                             "prefill_chunk_size=None")
        bounds = chunk_bounds(0, inputs.shape[1], chunk_size)
        for begin, end in bounds[:-1]:
            model(*args, **_chunk_inputs(kwargs, begin, end))
        return args, _chunk_inputs(kwargs, *bounds[-1])

    return hook


def _chunk_inputs(kwargs: dict, begin: int, end: int) -> dict:
    """Forward keyword arguments for tokens [begin, end) of a prompt (the cache holds tokens [0, begin))."""
    chunk = dict(kwargs)
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            chunk[name] = kwargs[name][:, begin:end]
    if kwargs.get("attention_mask") is not None:
        chunk["attention_mask"] = kwargs["attention_mask"][:, :end]
    if kwargs.get("position_ids") is not None:
        chunk["position_ids"] = kwargs["position_ids"][..., begin:end]
    if kwargs.get("cache_position") is not None:  # transformers 5.2
        chunk["cache_position"] = kwargs["cache_position"][begin:end]
    return chunk


# -- caches ----------------------------------------------------------------------------------------------
def new_cache(model):
    """An empty DynamicCache for `model`."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def copy_cache(cache, batch_size: int = 1):
    """A copy of `cache` (plain or compressed layers) that may be extended and compressed without touching
    the original: its tensors are cloned, each row repeated `batch_size` times."""
    copied = copy.copy(cache)
    copied.layers = [copy.deepcopy(layer) for layer in cache.layers]
    if batch_size > 1:
        for layer in copied.layers:
            layer.batch_repeat_interleave(batch_size)
    return copied


def layer_state(layer) -> tuple[dict[str, torch.Tensor], dict]:
    """What rebuilds a stock cache layer (`restore_layer`): its tensors and its plain settings. A full-attention
    layer holds its keys and values; a sliding-window layer its last window and how many tokens it has seen."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
        raise TypeError(f"cannot save a {type(layer).__name__} cache layer: only DynamicLayer, "
                        "DynamicSlidingWindowLayer and snapkv's compressed layers can be saved")
    tensors = {"keys": layer.keys, "values": layer.values}
    if isinstance(layer, DynamicSlidingWindowLayer):
        return tensors, {"seen": int(layer.cumulative_length)}
    return tensors, {}


def restore_layer(layer, tensors: dict[str, torch.Tensor], settings: dict) -> None:
    """Fill an empty stock cache layer (of the class that `layer_state` read) with what `layer_state` returned."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    layer.lazy_initialization(tensors["keys"], tensors["values"])
    layer.keys, layer.values = tensors["keys"], tensors["values"]
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = settings["seen"]


def generate(model, ids: torch.Tensor, cache, **kwargs):
    """`model.generate(ids, ...)` continuing from `cache`, which holds the first tokens of `ids` (only the
    rest is fed to the model)."""
    return model.generate(ids, **{cache_keyword(model): cache}, **kwargs)


def mask_query_length(query) -> int:
    """The query length a cache layer's `get_mask_sizes` is given: transformers 5.2 passes cache_position
    (a tensor), later releases the length itself."""
    return query.shape[0] if isinstance(query, torch.Tensor) else int(query)


# -- models ----------------------------------------------------------------------------------------------
def attention_implementation(model) -> str | None:
    """The name of the attention implementation `model` runs (e.g. "sdpa")."""
    return model.config._attn_implementation


def set_attention_implementation(model, name: str) -> None:
    model.set_attn_implementation(name)


def attention_function(module, kernel: str):
    """The attention function `kernel` names for the attention `module`: the model file's own
    `eager_attention_forward` for "eager", else the one registered with transformers' AttentionInterface."""
    if kernel == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[kernel]


def attention_modules(model) -> dict:
    """{layer index: attention module} of a decoder (the modules transformers names `self_attn`)."""
    return {module.layer_idx: module for name, module in model.named_modules() if name.endswith("self_attn")}


def attention_input(args, kwargs) -> torch.Tensor:
    """The hidden states (batch, q, hidden) an attention module's forward was called with."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def model_label(model) -> str | None:
    """What the model was loaded from (a hub id, a folder, or the default model's name); None if unknown."""
    return model.config.name_or_path or None


def set_model_label(model, label: str) -> None:
    model.config.name_or_path = label


def drop_gguf_quantization(model) -> None:
    """A model loaded from GGUF holds plain float weights but still carries the GGUF quantizer marker;
    drop it so that the model saves and reloads as an ordinary float model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
