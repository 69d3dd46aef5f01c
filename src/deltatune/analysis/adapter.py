"""A LoRA adapter as the analyses see it: per module, the factors A (r, in) and B (out, r) and the scaling.

The source is an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's layout)
or a live :class:`~deltatune.PeftModel` (its active adapter). Module names are PEFT's tensor names without
the ``base_model.model.`` prefix and the ``.lora_A.weight`` suffix, e.g. ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import read_config_dict
from ..finite import all_finite
from ..formats.peft import read_adapter_weights
from ..targets import resolve_pattern

PREFIX = "base_model.model."
# (suffix of A, suffix of B): linear/conv layers, and embedding layers (whose PEFT tensors have no ".weight").
FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))

AdapterSource = str | os.PathLike | nn.Module


@dataclass
class LoraFactors:
    """One module's LoRA update: delta W = scaling * B @ A (Hu et al. 2021, eq. 3)."""

    A: torch.Tensor  # (r, in), float64
    B: torch.Tensor  # (out, r), float64
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

    @property
    def r(self) -> int:
        return self.A.shape[0]


def load_lora(source: AdapterSource) -> dict[str, LoraFactors]:
    """Read every LoRA module of an adapter folder or PeftModel, in file order.

    Raises:
        ValueError: the adapter is not LoRA, a module lacks A or B, A and B disagree on r, r disagrees with the
            config's rank_pattern, or a tensor holds NaN/Inf (the error names the tensor).
        FileNotFoundError: a folder that is not an adapter folder.
    """
    config, tensors, label = _read_source(source)
    peft_type = str(config.get("peft_type", "")).upper().removeprefix("PEFTTYPE.")
    if peft_type != "LORA":
        raise ValueError(f"{label} is a {config.get('peft_type')} adapter; the analyses read only LoRA adapters "
                         f"(peft_type LORA) for now.")
    factors = {}
    for name, (a, b) in _pairs(tensors, label).items():
        factors[name] = _factors(name, a, b, config, label)
    if not factors:
        raise ValueError(f"{label} holds no LoRA factors (no tensor named *.lora_A.weight / *.lora_B.weight).")
    return factors


def _read_source(source: AdapterSource) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config dict, PEFT-named tensors, a label for messages) of a folder or a PeftModel's active adapter."""
    if isinstance(source, nn.Module):
        from ..functional import get_peft_model_state_dict

        configs = getattr(source, "peft_config", None)
        if not isinstance(configs, dict) or not configs:
            raise ValueError(f"{type(source).__name__} is not a PeftModel (no peft_config); pass an adapter folder "
                             f"or the model get_peft_model returned.")
        name = getattr(source, "active_adapter", next(iter(configs)))
        config = configs[name].to_dict()
        return config, get_peft_model_state_dict(source, adapter_name=name), f"PeftModel adapter {name!r}"
    directory = os.fspath(source)
    return read_config_dict(directory), read_adapter_weights(directory), directory


def _pairs(tensors: dict[str, torch.Tensor], label: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A tensor, B tensor), matching each A with its B."""
    pairs = {}
    for key, a in tensors.items():
        for suffix_a, suffix_b in FACTOR_SUFFIXES:
            if key.endswith(suffix_a):
                key_b = key[: -len(suffix_a)] + suffix_b
                if key_b not in tensors:
                    raise ValueError(f"{label}: {key} has no matching {key_b}.")
                pairs[key[: -len(suffix_a)].removeprefix(PREFIX)] = (a, tensors[key_b])
    return pairs


def _factors(name: str, a: torch.Tensor, b: torch.Tensor, config: dict[str, Any], label: str) -> LoraFactors:
    """Check and convert one module's factors to float64.

    Conv kernels are flattened to A (r, in*k*k), B (out, r); embedding factors are stored by PEFT as
    A (r, num_embeddings), B (dim, r), the transpose of the update, which has the same singular values.
    """
    for part, tensor in (("A", a), ("B", b)):
        if not all_finite(tensor):
            raise ValueError(f"{label}: the LoRA {part} weight of {name} holds NaN or Inf.")
    a = a.detach().to("cpu", torch.float64).reshape(a.shape[0], -1)
    b = b.detach().to("cpu", torch.float64).reshape(b.shape[0], -1)
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"{label}: {name} has A with r={a.shape[0]} but B with r={b.shape[1]}.")
    r = a.shape[0]
    expected = resolve_pattern(config.get("rank_pattern") or {}, name, config.get("r", r))
    if expected != r:
        raise ValueError(f"{label}: {name} has r={r} in its weights but r={expected} in its config.")
    alpha = float(resolve_pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r)))
    scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return LoraFactors(a, b, scaling)
