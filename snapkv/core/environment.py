"""The one record of where a number came from: model, versions, device and date."""

import datetime
import os
import platform

import torch


def environment(model=None) -> dict:
    """Model, versions, device and date, stored next to every result."""
    import transformers

    import snapkv

    info = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "snapkv_version": snapkv.__version__,
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if model is not None:
        parameter = next(model.parameters(), None)
        info |= {
            "model_id": getattr(model.config, "_name_or_path", None) or None,
            "model_type": getattr(model.config, "model_type", None),
            "dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
            "device": str(parameter.device) if parameter is not None else None,
        }
    return info
