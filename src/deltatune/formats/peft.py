"""HF PEFT's adapter folder: adapter_config.json + adapter_model.safetensors.

Tensor names are PEFT's: the wrapped model's state-dict key with the adapter name left out,
e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; a modules_to_save copy is
stored under the plain module key (``base_model.model.classifier.weight``). Adapters other than
"default" go to a sub-folder named after them. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..adapter_layer import adapter_layers
from ..config import PeftConfig

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def adapter_tensors(
    root: nn.Module, config: PeftConfig, adapter_name: str, save_embedding_layers: bool = False
) -> dict[str, torch.Tensor]:
    """The live tensors that make up one adapter, under the names PEFT writes.

    Args:
        root: the ``PeftModel`` (its parameter names start with ``base_model.model.``).
        config: the adapter's config (its ``bias`` mode decides which biases belong to it).
        save_embedding_layers: also include the full input/output embedding weights (PEFT does
            this by default when an embedding is targeted; we do it only when asked, since the
            file then holds a second copy of the vocabulary matrix).
    """
    out: dict[str, torch.Tensor] = {}
    layers = dict(adapter_layers(root))
    for path, layer in layers.items():
        for key, tensor in layer.adapter_state_dict(adapter_name).items():
            out[f"{path}.{key}"] = tensor
    bias = getattr(config, "bias", "none")
    if bias == "all":
        wrapped = tuple(f"{path}." for path, layer in layers.items() if hasattr(layer, "original_module"))
        for name, param in root.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and not name.startswith(wrapped):
                out[name] = param
    elif bias == "lora_only":
        for path, layer in layers.items():
            base_bias = getattr(layer.base_layer, "bias", None)
            is_copy = hasattr(layer, "original_module")  # modules_to_save: its bias is in the copy already
            if base_bias is not None and adapter_name in layer.adapter_names() and not is_copy:
                out[f"{path}.base_layer.bias"] = base_bias
    if save_embedding_layers:
        for path, layer in layers.items():
            if getattr(layer, "kind", None) == "embedding":
                out[f"{path}.base_layer.weight"] = layer.base_layer.weight
    return out


def write_adapter(
    directory: str | os.PathLike, config: PeftConfig, tensors: dict[str, torch.Tensor], extra_config: dict[str, Any]
) -> None:
    """Write one adapter folder: the config JSON and the tensors as safetensors."""
    os.makedirs(directory, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(directory, **extra_config)


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of an adapter folder: safetensors, or a legacy .bin read with weights_only=True."""
    directory = os.fspath(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is no dict
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            weights = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses anything but plain tensors
            raise ValueError(f"{legacy} could not be read as plain tensors (weights_only=True): {err}") from err
        if not isinstance(weights, dict):
            raise ValueError(f"{legacy} does not hold a dict of tensors.")
        return weights
    raise FileNotFoundError(f"{directory!r} holds no {WEIGHTS_NAME} (nor a legacy {LEGACY_WEIGHTS_NAME}).")


def _model_tensor_for(key: str, model_tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A base tensor the file names directly, also under the older name without ``base_layer``."""
    if key in model_tensors:
        return model_tensors[key]
    path, _, leaf = key.rpartition(".")
    return model_tensors.get(f"{path}.base_layer.{leaf}")


@torch.no_grad()
def load_adapter_tensors(
    root: nn.Module, config: PeftConfig, adapter_name: str, weights: dict[str, torch.Tensor],
    skip_mismatched: bool = False,
) -> tuple[list[str], list[str]]:
    """Copy file tensors into the adapter ``adapter_name`` already attached to ``root``.

    Keys that are not adapter tensors but name a tensor of the model (biases for bias="all",
    embedding weights PEFT saved alongside) are loaded too, as PEFT does.

    Returns:
        (missing, unexpected): adapter keys the file lacks; file keys the model has no place for.

    Args:
        skip_mismatched: tensors whose shape does not fit are left out with a warning (PEFT's
            ``ignore_mismatched_sizes``) instead of refused.

    Raises:
        ValueError: a shape does not fit; names the key and both shapes. Nothing is copied then.
    """
    expected = adapter_tensors(root, config, adapter_name)
    model_tensors = root.state_dict(keep_vars=True)
    plan, unexpected, mismatched = [], [], []
    for key, value in weights.items():
        target = expected.get(key)
        if target is None:
            target = _model_tensor_for(key, model_tensors)
        if target is None:
            unexpected.append(key)
        elif target.shape != value.shape:
            mismatched.append(f"{key}: file has {tuple(value.shape)}, model has {tuple(target.shape)}")
        else:
            plan.append((target, value))
    if mismatched and skip_mismatched:
        warnings.warn("Skipping adapter tensors whose shape does not fit (ignore_mismatched_sizes=True):\n  "
                      + "\n  ".join(mismatched), stacklevel=3)
    elif mismatched:
        raise ValueError(
            "The adapter's tensors do not fit this model (was it trained on another base model or rank?):\n  "
            + "\n  ".join(mismatched)
        )
    for target, value in plan:
        target.data.copy_(value.to(device=target.device, dtype=target.dtype))
    missing = [k for k in expected if k not in weights]
    return missing, unexpected
