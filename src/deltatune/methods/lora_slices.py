"""LoRA on chosen slices of a fused projection: loralib's ``MergedLinear`` / ``enable_lora`` (Hu et al. 2021).

Why: GPT-2's ``c_attn`` and Phi-3's ``qkv_proj`` compute q, k and v in one layer, so "LoRA on q and v", the
LoRA paper's setting, is not a choice of target modules there. ``LoraConfig(enable_lora=[True, False, True])``
gives each enabled slice its own rank-r pair: ``W_q += s B_q A_q``, ``W_v += s B_v A_v``, k untouched.

How: the adapter is held as one LoRA of rank r x (enabled slices) whose B is block-diagonal over the enabled
slices (A stacks A_q over A_v; B's q rows read A_q's part, its v rows A_v's, its k rows nothing), with
``scaling = alpha / r`` as each slice has rank r. A gradient mask keeps the off-diagonal blocks at zero, so
every LoRA feature (the fused training path, merging, several adapters, mixed batches) works unchanged, and the
adapter *is* a plain LoRA adapter of rank r x k: that is how it is written, loadable by PEFT with equal outputs
(``file_config`` sets its rank and alpha per module). The block structure is not in PEFT's format, so an adapter
loaded from a file trains as plain LoRA on the whole layer.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

# model_type -> (fused module name, how its output rows split into q, k, v)
FUSED_QKV = {"gpt2": "c_attn", "phi3": "qkv_proj"}


def check_enable_lora(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, bool) for v in value):
        raise ValueError(f"enable_lora must be a list of True/False, one per slice of the fused layer (q, k, v: "
                         f"[True, False, True] adapts q and v), got {value!r}.")
    if not any(value):
        raise ValueError(f"enable_lora={value!r} enables no slice; enable at least one (or leave the layer out).")


def qkv_rows(model: nn.Module, name: str, layer: nn.Module, parts: int) -> list[int]:
    """The sizes of the q, k, v slices of fused layer ``name`` of ``model`` (known layouts only)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    leaf = name.rsplit(".", 1)[-1]
    out = layer.out_features if hasattr(layer, "out_features") else layer.weight.shape[-1]  # (Conv1D: (in, out))
    if FUSED_QKV.get(kind) != leaf:
        known = ", ".join(f"{module} of {model}" for model, module in FUSED_QKV.items())
        raise ValueError(f"{name}: enable_lora slices a fused q/k/v projection whose layout deltatune knows ({known}); "
                         f"this is {leaf!r} of a {kind or type(model).__name__} model. Target separate q/k/v "
                         "layers by name instead, or use deltatune.loralib.MergedLinear in your own model.")
    if parts != 3:
        raise ValueError(f"{name}: enable_lora needs one value per slice (q, k, v): 3 values, got {parts}.")
    if kind == "phi3":
        head = config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        sizes = [config.num_attention_heads * head, kv * head, kv * head]
    else:
        sizes = [out // 3] * 3
    if sum(sizes) != out:
        raise ValueError(f"{name}: its {out} outputs do not split into q, k, v of {sizes} as the config says.")
    return sizes


def block_mask(sizes: list[int], enable: list[bool], r: int) -> torch.Tensor:
    """(out, r * enabled) 0/1: enabled slice j's rows read columns j*r .. (j+1)*r of B."""
    mask = torch.zeros(sum(sizes), r * sum(enable))
    start, column = 0, 0
    for size, on in zip(sizes, enable, strict=True):
        if on:
            mask[start:start + size, column:column + r] = 1
            column += r
        start += size
    return mask


@torch.no_grad()
def restrict(layer: nn.Module, name: str, mask: torch.Tensor, r: int, lora_alpha: float, use_rslora: bool) -> None:
    """Make adapter ``name`` (created with rank r x k) the sliced one: per-slice scaling, B's other blocks zero and
    kept there by a gradient mask (Adam then leaves them at zero too: zero gradients give zero steps)."""
    weight = layer.lora_B[name].weight
    mask = mask.to(weight.device, weight.dtype)
    weight.mul_(mask)
    weight.register_hook(lambda grad: grad * mask)
    layer.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
    layer.lora_slices[name] = mask


def file_config(config: Any, layers: dict[str, nn.Module], adapter_name: str) -> Any:
    """The config to write for an adapter with sliced layers: plain LoRA, each sliced layer's rank (r x k) and
    alpha in rank_pattern / alpha_pattern, so that PEFT's alpha / r is the slice's scaling."""
    sliced = {path: layer for path, layer in layers.items()
              if adapter_name in getattr(layer, "lora_slices", {})}
    if not sliced:
        return config
    config = type(config).from_dict(config.to_dict())
    config.enable_lora = None
    ranks, alphas = {}, {}
    for path, layer in sliced.items():
        rank = layer.r[adapter_name]
        key = path.replace(".", r"\.")  # PEFT takes the first key that matches the end of a module's path
        ranks[key] = rank
        alphas[key] = layer.scaling[adapter_name] * (math.sqrt(rank) if config.use_rslora else rank)
    # a key of the user's that also matches a sliced layer is dropped: files are written with sorted keys, and PEFT
    # takes the first key that matches
    config.rank_pattern = {**_not_matching(config.rank_pattern, sliced), **ranks}
    config.alpha_pattern = {**_not_matching(config.alpha_pattern, sliced), **alphas}
    return config


def _not_matching(patterns: dict[str, Any], paths: dict[str, nn.Module]) -> dict[str, Any]:
    return {key: value for key, value in patterns.items()
            if not any(re.match(rf"(.*\.)?({key})$", path) for path in paths)}
