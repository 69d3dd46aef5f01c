"""The registry of methods: peft_type -> its config class and its attach function.

Adding a method is adding a file in this folder and one line to ``METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import PeftConfig
from . import bottleneck, ia3, lora


@dataclass(frozen=True)
class Method:
    """How the wrapper meets a method: build its config, attach it to a model."""

    config_class: type[PeftConfig]
    attach: Callable[[nn.Module, Any, str], list[str]]


METHODS: dict[str, Method] = {
    "LORA": Method(lora.LoraConfig, lora.attach),
    "BOTTLENECK": Method(bottleneck.BottleneckConfig, bottleneck.attach),
    "IA3": Method(ia3.IA3Config, ia3.attach),
}


def method_for(peft_type: str | None, source: str = "config") -> Method:
    """The registered method for ``peft_type``, or an error naming the known ones."""
    key = getattr(peft_type, "value", peft_type)
    if not isinstance(key, str) or key not in METHODS:
        raise ValueError(
            f"{source}: peft_type={peft_type!r} is not a method deltatune knows; known: {sorted(METHODS)}."
        )
    return METHODS[key]


def config_from_dict(data: dict[str, Any], source: str = "config") -> PeftConfig:
    """Turn a parsed adapter_config.json into the right config dataclass."""
    return method_for(data.get("peft_type"), source).config_class.from_dict(data, source=source)
