"""The small protocol through which the wrapper (``PeftModel``) knows every layer-wrapping method.

LoRA, bottleneck adapters, (IA)^3 and the modules_to_save copies all wrap a ``base_layer`` and keep
one set of weights per adapter name. The wrapper never looks inside them; it only calls what is
listed here. Methods that change the inputs instead (prefix, prompt, P-tuning) do not use this.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

BASE_ADAPTER = "__base__"  # in a mixed batch, rows tagged so run the base model alone


@runtime_checkable
class AdapterLayer(Protocol):
    """What a wrapping layer offers the wrapper.

    Attributes:
        base_layer: the wrapped original module.
        active_adapters: adapters applied in forward, in order.
        merged_adapters: adapters currently folded into ``base_layer``'s weight.
        disabled: when True, forward is the base layer's alone.
        batch_adapter_names: one adapter name per batch row (mixed batch) or None.
    """

    base_layer: nn.Module
    active_adapters: list[str]
    merged_adapters: list[str]
    disabled: bool
    batch_adapter_names: list[str] | None

    def adapter_names(self) -> list[str]: ...

    def delete_adapter(self, adapter_name: str) -> None: ...

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None: ...

    def unmerge(self) -> None: ...

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's own live tensors, under the keys PEFT writes (relative to this layer)."""
        ...

    def unwrapped(self, merge: bool) -> nn.Module:
        """The module that replaces this layer on unload (merged or not)."""
        ...


class WeightedLayer(nn.Module):
    """Base of the adapter layers that wrap one weighted layer (LoRA, (IA)^3): its weight and bias read through,
    so code that inspects ``q_proj.weight`` keeps working on a wrapped model, and ``merged`` says whether any
    adapter is folded in (PEFT's attribute of the same name)."""

    base_layer: nn.Module
    merged_adapters: list[str]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer in ``model``, with its full name."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def inside_adapter_layer(model: nn.Module) -> set[str]:
    """Names of adapter layers, whose children must never be targeted themselves."""
    return {name for name, _ in adapter_layers(model)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` was."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_batch_size(adapter_names: list[str], batch: int) -> None:
    if len(adapter_names) != batch:
        raise ValueError(
            f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows; "
            "give one adapter name (or '__base__') per row."
        )


def rows_by_adapter(adapter_names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Row indices of a mixed batch grouped by adapter name, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)
    return {name: torch.tensor(rows, device=device) for name, rows in groups.items()}
