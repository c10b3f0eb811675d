"""The one record of where a number came from: model, versions, machine and date.

`environment(model, **extras)` is stored next to every result (figure JSONs, traces, benchmark JSONs);
`machine_description` and `package_versions` are its parts, which the notebook run record also shows;
`weights_fingerprint` tells one model's weights from another's (KV packs, the quality checkpoints, calibration).
"""

import datetime
import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from snapkv.core.compat import model_label


def environment(model=None, **extras) -> dict:
    """Versions, machine, date and load average, and the model's id, type, size, dtype and device when given.

    extras: further facts stored as given; they replace measured ones of the same name (e.g. the model_id,
        device and dtype of a model that runs in another process, or its torch_threads).
    """
    import transformers

    import snapkv

    info = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "snapkv_version": snapkv.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        **machine_description(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if model is not None:
        info |= model_description(model)
    return info | extras


def model_description(model) -> dict:
    """The model's id, type, parameter count, and the dtype and device of its parameters."""
    parameter = next(model.parameters(), None)
    return {
        "model_id": model_label(model),
        "model_type": getattr(model.config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
        "device": str(parameter.device) if parameter is not None else None,
    }


FINGERPRINT_SAMPLES = 1024  # values read per parameter tensor by `weights_fingerprint`


def weights_fingerprint(model, samples: int = FINGERPRINT_SAMPLES) -> str:
    """sha256 of every parameter's name, shape and `samples` of its values, evenly spaced: it tells two
    checkpoints (another training run, a fine-tune, another seed) apart without reading all their weights. The
    one identity of a model's weights: KV packs store it, and the quality checkpoints' and calibration cache's
    key (`quality.runner.model_fingerprint`) hashes it with the config and tokenizer."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def machine_description() -> dict:
    """CPU model and count, memory, and the CUDA device with its memory (None without one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_properties(torch.cuda.current_device()) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(memory, 1) if memory else None,
        "gpu": gpu.name if gpu else None,
        "gpu_memory_gib": gpu.total_memory / 2**30 if gpu else None,
        "cuda_version": torch.version.cuda if gpu else None,
    }


def package_versions(packages) -> dict[str, str | None]:
    """The installed version of each package (None when it is not installed)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
