"""loralib's vocabulary for people who build their own models.

``deltatune.loralib.Linear(in, out, r=8)`` is a layer with LoRA built in, and
``mark_only_lora_as_trainable`` / ``lora_state_dict`` do what they do in loralib. The layers are
the same ``LoraLayer`` the rest of deltatune uses (adapter name "default"); merging is an explicit
``layer.merge()``, never a side effect of ``eval()``. ``MergedLinear`` (a fused q/k/v projection with LoRA on
chosen slices) keeps loralib's own parameter names and shapes, so the LoRA paper's GPT-2 checkpoints load as they
are; in a transformers model, ``LoraConfig(enable_lora=[True, False, True])`` does the same (``lora_slices.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import SparseDropout
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


class MergedLinear(nn.Module):
    """loralib's ``MergedLinear``: one linear layer computing ``len(enable_lora)`` equal output slices (q, k, v),
    with a rank-r LoRA pair on each enabled slice: ``y_j = W_j x + b_j + (lora_alpha / r) B_j A_j x``.

    Parameters are loralib's: ``weight`` (out, in), or (in, out) with ``fan_in_fan_out`` (GPT-2's Conv1D layout),
    ``bias``, ``lora_A`` (r * enabled, in) and ``lora_B`` (out / slices * enabled, r); ``merge()`` / ``unmerge()``
    fold the update into ``weight`` and back (explicitly: ``eval()`` never merges, unlike loralib's
    ``merge_weights``).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] | None = None, fan_in_fan_out: bool = False,
                 merge_weights: bool = False, bias: bool = True, **kwargs) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}.")
        if not enable_lora or not any(enable_lora) or out_features % len(enable_lora):
            raise ValueError(f"enable_lora must have at least one True and a length that divides out_features="
                             f"{out_features} (one value per equal slice, e.g. [True, False, True] for q, k, v), "
                             f"got {enable_lora!r}.")
        if merge_weights:
            raise ValueError("merge_weights=True (merging on eval()) is loralib's; here merging is explicit: call "
                             "layer.merge() after training.")
        linear = nn.Linear(in_features, out_features, bias=bias, **kwargs)
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.enable_lora, self.fan_in_fan_out = list(enable_lora), fan_in_fan_out
        self.scaling = lora_alpha / r
        self.weight = nn.Parameter(linear.weight.detach().t().contiguous() if fan_in_fan_out else linear.weight.data,
                                   requires_grad=False)
        self.bias = linear.bias
        enabled, self.slice_size = sum(self.enable_lora), out_features // len(self.enable_lora)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r * enabled, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.slice_size * enabled, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = SparseDropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False

    def _weight(self) -> torch.Tensor:
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _slices(self, after_a: torch.Tensor) -> torch.Tensor:
        """(..., out): each enabled slice's B_j (A_j x), zeros for the others."""
        parts, j = [], 0
        for on in self.enable_lora:
            if on:
                b_j = self.lora_B[j * self.slice_size:(j + 1) * self.slice_size]
                parts.append(after_a[..., j * self.r:(j + 1) * self.r] @ b_j.t())
                j += 1
            else:
                parts.append(after_a.new_zeros(*after_a.shape[:-1], self.slice_size))
        return torch.cat(parts, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """(out, in): scaling * the update of every slice (zero rows for slices without LoRA)."""
        return self._slices(self.lora_A.t()).t() * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._weight(), self.bias)
        if self.merged:
            return result
        after_a = self.lora_dropout(x) @ self.lora_A.t()
        return result + self._slices(after_a) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            delta = self.delta_weight().to(self.weight.dtype)
            self.weight += delta.t() if self.fan_in_fan_out else delta
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            delta = self.delta_weight().to(self.weight.dtype)
            self.weight -= delta.t() if self.fan_in_fan_out else delta
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"enable_lora={self.enable_lora}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}")


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
            elif isinstance(module, MergedLinear) and module.bias is not None:
                module.bias.requires_grad_(True)


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
            elif isinstance(module, MergedLinear) and module.bias is not None:
                key = f"{name}.bias" if name else "bias"
                out[key] = state[key]
        return out
    raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}.")
