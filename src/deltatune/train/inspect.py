"""``inspect``: what an adapter folder holds, read from its files without loading any model."""

from __future__ import annotations

import os
from typing import Any

from safetensors import safe_open

from ..config import CONFIG_NAME, PeftConfig, read_config_dict
from ..formats.peft import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME


def inspect_adapter(directory: str) -> dict[str, Any]:
    """Method, rank, alpha, targets, parameter count, file size and base model of an adapter folder.

    The config is checked as loading would check it, so inspect never reports an adapter that cannot load.

    Raises:
        FileNotFoundError: no adapter_config.json or weights file in ``directory``.
        ValueError: the config is not valid (not JSON, not an object, a wrong value), or the weights file is
            not readable safetensors; names the file.
    """
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} is not an adapter folder (no {CONFIG_NAME}).")
    PeftConfig.from_pretrained(directory)  # every field checked; the error names the file
    config = read_config_dict(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
        raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_NAME}" +
                                (f" (only the legacy {LEGACY_WEIGHTS_NAME}, which inspect does not read)"
                                 if os.path.isfile(legacy) else "") + ".")
    params, tensors, modules = 0, 0, set()
    for key, shape in _tensor_shapes(weights).items():
        count = 1
        for size in shape:
            count *= size
        params += count
        tensors += 1
        modules.add(key.split(".lora_")[0] if ".lora_" in key else key)
    targets = config.get("target_modules")
    return {
        "method": config.get("peft_type"),
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "dropout": config.get("lora_dropout"),
        "targets": sorted(targets) if isinstance(targets, list) else targets,
        "adapted_modules": len(modules),
        "parameters": params,
        "tensors": tensors,
        "file_bytes": os.path.getsize(weights),
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
    }


def _tensor_shapes(path: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, without reading the data.

    Raises:
        ValueError: the file is cut short or damaged (safetensors raises its own error types).
    """
    try:
        with safe_open(path, framework="pt") as fh:
            return {key: fh.get_slice(key).get_shape() for key in fh.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends; all mean "not readable"
        raise ValueError(f"{path} is not a readable safetensors file ({err}); the file is cut short or damaged. "
                         "Copy or save the adapter again.") from err


def format_report(info: dict[str, Any]) -> str:
    """The inspect result as aligned "key: value" lines."""
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if key == "file_bytes":
            value = f"{value:,d} bytes ({value / 2**20:.2f} MiB)"
        elif key == "parameters":
            value = f"{value:,d}"
        lines.append(f"{key.ljust(width)} : {value}")
    return "\n".join(lines)
