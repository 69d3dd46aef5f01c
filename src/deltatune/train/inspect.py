"""``inspect``: what an adapter folder holds, read from its files without loading any model."""

from __future__ import annotations

import os
import re
from typing import Any

from safetensors import safe_open

from ..config import CONFIG_NAME, PeftConfig, read_config_dict
from ..formats.peft import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from ..methods import method_for

# The trained tensors' own names at the end of a file key (LoRA's lora_A / lora_embedding_B, (IA)^3's ia3_l, a
# bottleneck adapter's adapter_down / adapter_up): what is left before them is the adapted module.
_ADAPTER_TENSOR = re.compile(r"\.(lora_\w+?|ia3_l|adapter_down|adapter_up)(\.(weight|bias))?$")


def inspect_adapter(directory: str) -> dict[str, Any]:
    """Method, its settings, targets, parameter count, file size and base model of an adapter folder.

    The settings shown are the ones ``deltatune train`` has flags for, named as the flags (``rank`` for LoRA's
    r): the registry entry of the file's method says which, so every method shows its own (LoRA: rank, alpha,
    dropout; (IA)^3: feed-forward modules; bottleneck: size, reduction factor, placement, non-linearity).
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
    shapes = _tensor_shapes(weights)
    params, modules = 0, set()
    for key, shape in shapes.items():
        count = 1
        for size in shape:
            count *= size
        params += count
        modules.add(_ADAPTER_TENSOR.sub("", key))
    targets = config.get("target_modules")
    return {
        "method": config.get("peft_type"),
        **method_settings(config, shapes),
        "targets": sorted(targets) if isinstance(targets, list) else targets,
        "adapted_modules": len(modules),
        "parameters": params,
        "tensors": len(shapes),
        "file_bytes": os.path.getsize(weights),
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
    }


def method_settings(config: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The method's own settings from its adapter_config.json, by the names of its ``deltatune train`` flags.

    A bottleneck adapter sized by reduction_factor records no bottleneck_size; its size is read from the
    tensors (adapter_down is m x hidden), so inspect always says how wide the adapter is.
    """
    method = method_for(config.get("peft_type"))
    if method.cli is None:
        return {}
    settings = {opt.label or opt.key: config.get(opt.field) for opt in method.cli.options}
    if "bottleneck_size" in settings and settings["bottleneck_size"] is None:
        sizes = sorted({shape[0] for key, shape in shapes.items() if key.endswith("adapter_down.weight")})
        settings["bottleneck_size"] = sizes[0] if len(sizes) == 1 else sizes or None
    return settings


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
