"""``AdaptedModel``: what ``PeftModel.base_model`` is (PEFT's tuner model, e.g. ``LoraModel``).

It holds the user's model as ``.model``, so parameter names start with ``base_model.model.`` as in PEFT's files,
and offers the tuner's own methods (enable/disable the adapter layers, the targeted module names); any other
attribute is the user's model's.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .adapter_layer import adapter_layers


class AdaptedModel(nn.Module):
    """Holds the user's model as ``.model`` so parameter names start with ``base_model.model.`` as in PEFT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def enable_adapter_layers(self) -> None:
        """Adapters take part in forward again (PEFT's tuner method of the same name)."""
        for _, layer in adapter_layers(self.model):
            layer.disabled = False

    def disable_adapter_layers(self) -> None:
        """Forward computes the base model alone until ``enable_adapter_layers``; merged adapters are unmerged."""
        for _, layer in adapter_layers(self.model):
            if layer.merged_adapters:
                warnings.warn("Adapters were merged; unmerging them to disable the adapter layers.", stacklevel=2)
                layer.unmerge()
            layer.disabled = True

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (relative to the wrapped model) of the modules an adapter method wraps; not modules_to_save."""
        return [name for name, layer in adapter_layers(self.model) if not hasattr(layer, "original_module")]
