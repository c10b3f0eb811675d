"""`Trace`: what every attention head looked at for one prompt, recorded by `snapkv.record`.

All attention is stored in *input positions*: column j is the j-th token of the (left-padded) prompt as it
was fed to the model. For a batch of one unpadded prompt, input positions are prompt positions. With left
padding, row i's prompt starts at input position `pad_lengths[i]`; the getters' `row=` argument returns that
row alone with the padding cut away (columns = the row's own prompt positions).

On disk a trace is a folder: `tensors.safetensors` (every tensor) + `metadata.json` (settings, model,
versions). `Trace.load(folder)` needs no model.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from snapkv.core.files import atomic_path

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "metadata.json"
REDUCERS = ("raw", "window_sum", "topk")


class Trace:
    """Recorded attention of one prompt (a batch of left-padded prompts), per layer and query head.

    tensors (all CPU):
      observation.{layer}            float32 (batch, heads, window, prompt_len)
      generation.{layer}             float32 (batch, heads, generated, prompt_len)          reducer "raw"
      generation_window_sums.{layer} float32 (batch, heads, windows, prompt_len)            reducer "window_sum"
      generation_topk_positions.{layer} int32 / _values.{layer} float32 (batch, heads, generated, k)  "topk"
      generated_mass.{layer}         float32 (batch, heads, generated)   (every reducer)
      kept_positions.{layer}         long (batch, cache_heads, kept), input positions, -1 unused slot
      input_ids (batch, prompt_len + fed tokens), attention_mask (batch, prompt_len), window_token_counts
    Generated row i is the attention of generated token i's query: `generate` never feeds its last token
    back, so N new tokens give N - 1 rows (teacher forcing gives one row per response token).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict):
        self.tensors = tensors
        self.metadata = metadata

    # -- what was recorded ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.metadata["layers"])

    @property
    def reducer(self) -> str:
        return self.metadata["reducer"]

    @property
    def prompt_length(self) -> int:
        """Width of the (padded) prompt in input positions."""
        return int(self.metadata["prompt_length"])

    @property
    def input_ids(self) -> torch.Tensor | None:
        """(batch, prompt_len + fed generated tokens); None when the model was fed embeddings."""
        return self.tensors.get("input_ids")

    @property
    def attention_mask(self) -> torch.Tensor:
        """(batch, prompt_len) long, 0 on left padding."""
        return self.tensors["attention_mask"]

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """(batch,) real prompt tokens per row."""
        return self.attention_mask.sum(-1)

    @property
    def pad_lengths(self) -> torch.Tensor:
        """(batch,) left padding per row: row i's prompt position p is input position p + pad_lengths[i]."""
        return self.prompt_length - self.prompt_lengths

    @property
    def generated(self) -> int:
        """Number of generated rows recorded."""
        return int(self.metadata["generated"])

    @property
    def text(self) -> list[str] | None:
        """Decoded prompt + fed tokens per row (padding removed) when a tokenizer was given, else None."""
        return self.metadata.get("text")

    def __repr__(self) -> str:
        meta = self.metadata
        return (f"Trace(model={meta['model_id']!r}, mode={meta['mode']!r}, batch={meta['batch']}, "
                f"prompt_length={meta['prompt_length']}, generated={meta['generated']}, layers={len(meta['layers'])}, "
                f"window_size={meta['window_size']}, reducer={meta['reducer']!r}, policy={meta['policy']!r})")

    # -- getters -------------------------------------------------------------------------------------
    def observation_attention(self, layer: int, row: int | None = None) -> torch.Tensor:
        """Attention of the observation window (last `window_size` prompt tokens) over the prompt.

        float32 (batch, heads, window, prompt_len); with `row`: (heads, window_i, prompt_length_i), that
        row's window over its own prompt positions (window_i = min(window, prompt_length_i)).
        """
        full = self._get("observation", layer)
        if row is None:
            return full
        pad, length = self._row_span(row)
        window = min(full.shape[-2], length)
        return full[row, :, full.shape[-2] - window :, pad:]

    def generation_attention(self, layer: int, row: int | None = None) -> torch.Tensor:
        """Each generated token's attention over the prompt (zeros at positions the cache had evicted).

        float32 (batch, heads, generated, prompt_len); with `row`: (heads, generated, prompt_length_i).
        Only reducer "raw" keeps these rows.
        """
        self._get("generated_mass", layer)  # raises for an unknown layer or generation=False
        if self.reducer != "raw":
            alternative = {"window_sum": "generation_window_sums(layer)", "topk": "generation_topk(layer)"}
            raise ValueError(
                f"this trace was recorded with reducer={self.reducer!r}, which does not keep the generated rows; "
                f"use {alternative[self.reducer]}, or record again with reducer='raw'"
            )
        return self._cut(self._get("generation", layer), row)

    def generated_mass(self, layer: int, row: int | None = None) -> torch.Tensor:
        """Attention each generated token put on generated tokens (itself included): (batch, heads, generated)."""
        mass = self._get("generated_mass", layer)
        return mass if row is None else mass[row]

    def generation_window_sums(self, layer: int, row: int | None = None) -> torch.Tensor:
        """Generated rows summed over windows of `reduce_window` tokens (reducer "window_sum").

        float32 (batch, heads, windows, prompt_len); divide by `window_token_counts` for the mean.
        """
        if self.reducer != "window_sum":
            raise ValueError(f"generation_window_sums needs a trace recorded with reducer='window_sum', "
                             f"this one used reducer={self.reducer!r}")
        return self._cut(self._get("generation_window_sums", layer), row)

    @property
    def window_token_counts(self) -> torch.Tensor:
        """(windows,) generated rows summed into each window (reducer "window_sum")."""
        if self.reducer != "window_sum":
            raise ValueError(f"window_token_counts needs reducer='window_sum', this trace used {self.reducer!r}")
        return self.tensors["window_token_counts"]

    def generation_topk(self, layer: int, row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k prompt positions of each generated row and their probabilities (reducer "topk").

        (positions long, values float32), each (batch, heads, generated, k), positions in input positions
        (with `row`: that row's prompt positions, (heads, generated, k)). Every other position was dropped.
        """
        if self.reducer != "topk":
            raise ValueError(f"generation_topk needs a trace recorded with reducer='topk', "
                             f"this one used reducer={self.reducer!r}")
        positions = self._get("generation_topk_positions", layer).long()
        values = self._get("generation_topk_values", layer)
        if row is None:
            return positions, values
        return positions[row] - self._row_span(row)[0], values[row]

    def kept_positions(self, layer: int, row: int | None = None) -> torch.Tensor | None:
        """Prompt positions the compressed cache of `layer` held, per cache head, ascending.

        long (batch, cache_heads, kept) input positions, -1 for slots a short row left unused; with `row`:
        (cache_heads, kept_i) in that row's prompt positions (AdaKV's heads keep different numbers: a head that
        keeps fewer starts with -1). None when the layer's cache was not compressed (no compression, a
        sliding-window layer, or a budget covering the whole prompt).
        """
        self._check_layer(layer)
        kept = self.tensors.get(f"kept_positions.{layer}")
        if kept is None or row is None:
            return kept
        mine = kept[row]
        mine = mine[:, mine.shape[-1] - int((mine >= 0).sum(-1).max()):]  # unused slots come first in every head
        return torch.where(mine >= 0, mine - self._row_span(row)[0], -1)

    # -- disk ----------------------------------------------------------------------------------------
    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write `path/tensors.safetensors` and `path/metadata.json`; nothing half-written is ever left
        (`write_folder`)."""
        return write_folder(path, self.tensors, self.metadata, FORMAT_VERSION, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "Trace":
        """Read a trace written by `save`. Raises FileNotFoundError for a missing folder/file and ValueError
        for a corrupt file or a trace written in another format version."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no trace folder at {path}")
        for name in (METADATA_FILE, TENSORS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} is not a complete trace: {name} is missing")
        try:
            metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path / METADATA_FILE} is not valid JSON ({error}): the trace is corrupt") from None
        version = metadata.get("format_version") if isinstance(metadata, dict) else None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path} holds a trace in format_version {version!r}, but this snapkv reads format_version "
                f"{FORMAT_VERSION}: record it again with this version"
            )
        try:
            tensors = load_file(str(path / TENSORS_FILE))
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path / TENSORS_FILE} cannot be read ({type(error).__name__}: {error}): the file is truncated "
                "or corrupt; record the trace again"
            ) from None
        missing = sorted(set(metadata.get("tensor_names", [])) - set(tensors))
        if missing:
            raise ValueError(f"{path / TENSORS_FILE} lacks tensors listed in metadata.json: {missing[:5]}")
        return cls(tensors, metadata)

    # -- helpers -------------------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if layer not in self.metadata["layers"]:
            raise ValueError(f"layer {layer} was not recorded; recorded layers: {self.metadata['layers']}")

    def _get(self, kind: str, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        if kind != "observation" and not self.metadata["generation"]:
            raise ValueError("this trace was recorded with generation=False: it holds the observation window only; "
                             "record again with generation=True for generated rows")
        return self.tensors[f"{kind}.{layer}"]

    def _row_span(self, row: int) -> tuple[int, int]:
        batch = self.attention_mask.shape[0]
        if not -batch <= row < batch:
            raise ValueError(f"row {row} is out of range: the trace holds {batch} prompt(s)")
        length = int(self.prompt_lengths[row])
        return self.prompt_length - length, length

    def _cut(self, tensor: torch.Tensor, row: int | None) -> torch.Tensor:
        return tensor if row is None else tensor[row, ..., self._row_span(row)[0]:]


def write_folder(path, tensors: dict[str, torch.Tensor], metadata: dict, format_version: int, *,
                 overwrite: bool = False) -> Path:
    """Write `path/tensors.safetensors` and `path/metadata.json` (a trace, a KV pack) into a temporary sibling
    folder, then rename it to `path` (replacing an existing one only with `overwrite`): a failure leaves `path`
    as it was, and nothing half-written is ever left."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass overwrite=True or choose another folder")
    with atomic_path(path, folder=True) as staging:
        cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        save_file(cpu, str(staging / TENSORS_FILE), metadata={"format_version": str(format_version)})
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
    return path
