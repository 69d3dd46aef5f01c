"""loralib's vocabulary for people who build their own models.

``deltatune.loralib.Linear(in, out, r=8)`` is a layer with LoRA built in, and
``mark_only_lora_as_trainable`` / ``lora_state_dict`` do what they do in loralib. The layers are
the same ``LoraLayer`` the rest of deltatune uses (adapter name "default"); merging is an explicit
``layer.merge()``, never a side effect of ``eval()``.
"""

from __future__ import annotations

import torch
from torch import nn

from .methods.lora import LoraLayer

DEFAULT = "default"


def _with_lora(base: nn.Module, r: int, lora_alpha: float, lora_dropout: float) -> LoraLayer:
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}.")
    layer = LoraLayer(base)
    layer.add_adapter(DEFAULT, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    layer.active_adapters = [DEFAULT]
    return layer


def Linear(  # noqa: N802 - a constructor, named as in loralib
    in_features: int, out_features: int, r: int = 8, lora_alpha: float = 1, lora_dropout: float = 0.0,
    fan_in_fan_out: bool = False, bias: bool = True, **kwargs,
) -> LoraLayer:
    """An nn.Linear with a LoRA adapter: y = W x + b + (lora_alpha / r) B A x.

    ``fan_in_fan_out`` (a weight stored (in, out)) is for GPT-2's Conv1D: wrap that layer with
    ``LoraLayer`` or ``get_peft_model`` instead; here it is refused.
    """
    if fan_in_fan_out:
        raise ValueError("lora.Linear stores its weight (out, in); for GPT-2's Conv1D use get_peft_model.")
    return _with_lora(nn.Linear(in_features, out_features, bias=bias, **kwargs), r, lora_alpha, lora_dropout)


def Embedding(  # noqa: N802
    num_embeddings: int, embedding_dim: int, r: int = 8, lora_alpha: float = 1, **kwargs
) -> LoraLayer:
    """An nn.Embedding with a LoRA adapter on its table."""
    return _with_lora(nn.Embedding(num_embeddings, embedding_dim, **kwargs), r, lora_alpha, 0.0)


def Conv2d(  # noqa: N802
    in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], r: int = 8, lora_alpha: float = 1,
    lora_dropout: float = 0.0, **kwargs,
) -> LoraLayer:
    """An nn.Conv2d with a LoRA adapter (A a conv of the same kernel into r channels, B a 1x1 conv)."""
    return _with_lora(nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs), r, lora_alpha, lora_dropout)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but LoRA weights; ``bias`` is "none", "all" or "lora_only" (biases of LoRA layers)."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}.")
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoraLayer) and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA weights (and biases, per ``bias``) of ``model``: what to save after training."""
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or k.rsplit(".", 1)[-1] == "bias"}
    if bias == "lora_only":
        out = {k: v for k, v in state.items() if "lora_" in k}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and getattr(module.base_layer, "bias", None) is not None:
                key = f"{name}.base_layer.bias" if name else "base_layer.bias"
                out[key] = state[key]
        return out
    raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}.")
