"""A cache layer holding a compressed prompt: per-head slots that remember their prompt positions."""

import torch
from transformers.cache_utils import DynamicLayer

from snapkv.core.compat import mask_query_length

ARENA_BYTES = 33 * 2**20  # above glibc's largest mmap threshold (32 MiB on 64-bit): a block this size is mmapped
ARENA_ALIGN = 64  # bytes; every placed tensor starts on a multiple of this


class SlotArena:
    """Where a prompt's compressed layers keep their tensors on the CPU: packed into blocks of `ARENA_BYTES`.

    Why: glibc serves an allocation below its mmap threshold from the heap, and the threshold rises (up to
    32 MiB) each time a large block is freed. Allocated one by one, each layer's kept slots land on the heap
    between the prompt's freed keys and values and the next layer's temporaries, and pin that memory: a heap
    gives memory back only from its top. Packed into mmapped blocks, they leave the heap to be reused, and a
    block is returned whole once its last tensor is gone (after the first decoding step's `torch.cat`). A
    block's untouched pages are never resident; a tensor placed here keeps its whole block alive, so place only
    what lives as long as the cache. The README's peak-memory figures measure it. On other devices
    (CUDA's caching allocator) tensors are returned as they are.
    """

    def __init__(self):
        self.block: torch.Tensor | None = None
        self.used = 0

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` inside the arena (contiguous, same dtype and shape); `tensor` itself off the CPU."""
        if tensor.device.type != "cpu":
            return tensor
        size = -(-tensor.nbytes // ARENA_ALIGN) * ARENA_ALIGN
        if self.block is None or self.used + size > self.block.numel():
            self.block, self.used = torch.empty(max(size, ARENA_BYTES), dtype=torch.uint8), 0
        placed = self.block[self.used : self.used + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        self.used += size
        return placed.copy_(tensor)


class CompressedLayer(DynamicLayer):
    """Keys/values (batch, cache_heads, slots, head_dim) of the kept prompt positions, then decoded tokens.

    `positions` (batch, cache_heads, kept) are the input positions of the kept slots (-1 where a
    row had fewer real tokens than the budget: such slots are masked). The layer reports its
    *logical* length (prompt + appended tokens), so transformers keeps giving new tokens the right
    rotary positions; the attention hook builds the mask for the physical slots.
    """

    def __init__(self, keys, values, positions, prompt_length: int, groups: int):
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True
        self.positions = positions
        self.prompt_length = prompt_length
        self.groups = groups  # kv heads repeated per cache head on update (gqa="expand"), else 1
        self.appended = keys.shape[-2] - positions.shape[-1]
        self.all_valid = bool((positions >= 0).all())  # decoded tokens are always valid

    def update(self, key_states, value_states, *args, **kwargs):
        if self.groups > 1:
            key_states = key_states.repeat_interleave(self.groups, dim=1)
            value_states = value_states.repeat_interleave(self.groups, dim=1)
        self.appended += key_states.shape[-2]
        return super().update(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.prompt_length + self.appended

    def get_mask_sizes(self, query) -> tuple[int, int]:
        return self.get_seq_length() + mask_query_length(query), 0

    def slot_positions(self) -> torch.Tensor:
        """(batch, cache_heads, slots): the input position of every slot, -1 for masked slots."""
        b, h, _ = self.positions.shape
        start = self.prompt_length
        tail = torch.arange(start, start + self.appended, device=self.positions.device).expand(b, h, -1)
        return torch.cat([self.positions, tail], dim=-1)

    def attention_mask(self, query_length: int, query_heads: int) -> torch.Tensor | None:
        """Boolean mask (batch, query_heads, query_length, slots) for the newest `query_length` tokens, or None."""
        if query_length == 1 and self.all_valid:
            return None
        valid = self.slot_positions() >= 0
        slots = valid.shape[-1]
        rows = torch.arange(slots - query_length, slots, device=valid.device)[:, None]
        causal = torch.arange(slots, device=valid.device)[None, :] <= rows
        mask = valid[:, :, None, :] & causal
        return mask.repeat_interleave(query_heads // mask.shape[1], dim=1)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What rebuilds this layer (`from_state`; a KV pack on disk): its tensors and its plain settings."""
        return ({"keys": self.keys, "values": self.values, "positions": self.positions},
                {"prompt_length": self.prompt_length, "groups": self.groups})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], settings: dict) -> "CompressedLayer":
        return cls(tensors["keys"], tensors["values"], tensors["positions"], **settings)

    def crop(self, *args, **kwargs):
        raise NotImplementedError("a compressed cache layer cannot be cropped (assisted decoding is unsupported)")

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.positions = self.positions[indices]

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.positions = self.positions.repeat_interleave(repeats, dim=0)


class RaggedLayer(CompressedLayer):
    """A compressed prompt whose heads keep different numbers of positions (AdaKV).

    The kept prompt slots are stored flat, `prompt_keys` / `prompt_values` (kept slots of every row and head,
    head_dim), so the layer holds what the heads keep, not the most any head keeps; `keys` / `values` hold the
    decoded tokens only. Each attention call gets a padded view (batch, cache_heads, widest head + decoded,
    head_dim) whose padding slots are -1 in `slot_positions` and masked, built for that call only.
    """

    def __init__(self, keys, values, positions, prompt_length: int, groups: int):
        width = positions.shape[-1]
        super().__init__(keys[:, :, width:], values[:, :, width:], positions, prompt_length, groups)
        self.kept = positions >= 0
        self.prompt_keys, self.prompt_values = keys[:, :, :width][self.kept], values[:, :, :width][self.kept]
        self.appended = keys.shape[-2] - width

    def _padded(self, flat: torch.Tensor) -> torch.Tensor:
        out = flat.new_zeros(*self.kept.shape, flat.shape[-1])
        out[self.kept] = flat
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        return (torch.cat([self._padded(self.prompt_keys), keys], dim=-2),
                torch.cat([self._padded(self.prompt_values), values], dim=-2))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """As `CompressedLayer.state`, with the flat kept slots (no padding on disk either)."""
        return ({"prompt_keys": self.prompt_keys, "prompt_values": self.prompt_values, "keys": self.keys,
                 "values": self.values, "positions": self.positions},
                {"prompt_length": self.prompt_length, "groups": self.groups})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], settings: dict) -> "RaggedLayer":
        layer = cls.__new__(cls)
        CompressedLayer.__init__(layer, tensors["keys"], tensors["values"], tensors["positions"], **settings)
        layer.kept = tensors["positions"] >= 0
        layer.prompt_keys, layer.prompt_values = tensors["prompt_keys"], tensors["prompt_values"]
        layer.appended = tensors["keys"].shape[-2]
        return layer

    def mean_slots(self) -> float:
        """Slots per cache head, averaged over rows and heads (kept prompt positions + decoded tokens)."""
        return float(self.kept.sum()) / self.kept[..., 0].numel() + self.appended

    def _reselect(self, change) -> None:
        """Apply a batch change (select or repeat rows) to the flat prompt slots through their padded view."""
        keys, values = change(self._padded(self.prompt_keys)), change(self._padded(self.prompt_values))
        self.kept = change(self.kept)
        self.prompt_keys, self.prompt_values = keys[self.kept], values[self.kept]

    def batch_select_indices(self, indices):
        self._reselect(lambda tensor: tensor[indices])
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int):
        self._reselect(lambda tensor: tensor.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)
