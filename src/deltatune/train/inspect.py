"""``inspect``: what an adapter folder holds, read from its files without loading any model."""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors import safe_open

from ..config import CONFIG_NAME
from ..formats.peft import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME


def inspect_adapter(directory: str) -> dict[str, Any]:
    """Method, rank, alpha, targets, parameter count, file size and base model of an adapter folder.

    Raises:
        FileNotFoundError: no adapter_config.json or weights file in ``directory``.
    """
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} is not an adapter folder (no {CONFIG_NAME}).")
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
        raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_NAME}" +
                                (f" (only the legacy {LEGACY_WEIGHTS_NAME}, which inspect does not read)"
                                 if os.path.isfile(legacy) else "") + ".")
    params, tensors, modules = 0, 0, set()
    with safe_open(weights, framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is no dict
            shape = fh.get_slice(key).get_shape()
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
