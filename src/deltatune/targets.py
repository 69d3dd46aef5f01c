"""Choosing which modules of a model an adapter wraps.

The matching rules are PEFT's, so a config means the same thing in both libraries:
a list item matches a module whose full name equals it or ends with "." + item; a string is a
regex that must match the whole name; "all-linear" is every Linear (or GPT-2 Conv1D) except the
output head.

Adding a second adapter must land on the same modules whatever is already attached, so selection
sees through adapter layers: a LoRA-wrapped layer counts as the layer it wraps (an all-linear
second adapter still finds q_proj after a first adapter wrapped it), while the wrapper's own
children (``base_layer``, ``lora_A.<name>``, a modules_to_save ``original_module`` and its copies)
are never targets themselves.
"""

from __future__ import annotations

import difflib
import re
import sys
import warnings
from collections.abc import Iterable

from torch import nn

from .adapter_layer import AdapterLayer

ALL_LINEAR = "all-linear"

# Heads that SEQ_CLS models train in full and that "all-linear" leaves alone.
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
# Names of the container that holds a model's repeated blocks, for layers_to_transform.
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def gpt2_conv1d_class() -> type | None:
    """transformers' Conv1D class if transformers is already imported (never imports it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and relatives): a linear layer whose weight is stored (in, out)."""
    conv1d = gpt2_conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def fan_in_fan_out_for(base: nn.Module, config: object, name: str) -> bool:
    """Whether ``base`` stores its weight (in, out), as GPT-2's Conv1D does; a wrong ``config.fan_in_fan_out`` is
    corrected with a warning, as PEFT does (for every method that has the flag)."""
    conv1d = gpt2_conv1d_class()
    if conv1d is not None and isinstance(base, conv1d):
        if not config.fan_in_fan_out:
            warnings.warn(f"{name} is a Conv1D (weight stored in x out); setting fan_in_fan_out=True.", stacklevel=3)
            config.fan_in_fan_out = True
        return True
    if config.fan_in_fan_out and isinstance(base, nn.Linear):
        warnings.warn(f"{name} is an nn.Linear; fan_in_fan_out=True does not apply and is set to False.", stacklevel=3)
        config.fan_in_fan_out = False
    return False


def is_quantized(module: nn.Module) -> bool:
    """A quantized linear layer (deltatune.quant's Linear4bit/Linear8bit, or anything shaped like them).

    Such a layer stores codes, not floats: adapters run beside it and merging goes through a dequantized copy.
    """
    return callable(getattr(module, "dequantized_weight", None)) and hasattr(module, "in_features")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D, or a quantized linear layer: what "all-linear" selects."""
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module) or is_quantized(module)


def is_modules_to_save_wrapper(module: nn.Module) -> bool:
    """A modules_to_save holder (deltatune's or PEFT's layout: ``original_module`` + ``modules_to_save`` copies).

    Such a wrapper trains whole copies of a module; it is not a layer a LoRA adapter can be added to, and
    the copies inside it must never receive LoRA (PEFT refuses that combination for the same reason).
    """
    return isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and isinstance(
        getattr(module, "original_module", None), nn.Module)


def is_adapter_layer(module: nn.Module) -> bool:
    """A layer-wrapping adapter layer (LoRA and friends, or a modules_to_save wrapper)."""
    return isinstance(module, AdapterLayer)


def base_of(module: nn.Module) -> nn.Module:
    """The layer that ``module`` stands for in type checks: its innermost ``base_layer`` when it is an adapter layer.

    A LoRA-wrapped q_proj is still a Linear for "all-linear" and for choosing the kind of layer to build, so
    adding adapters in any order selects the same modules. A modules_to_save wrapper is left as it is: it
    is not an adaptable layer (see :func:`is_modules_to_save_wrapper`).
    """
    while is_adapter_layer(module) and not is_modules_to_save_wrapper(module):
        module = module.base_layer
    return module


def adapter_layer_names(model: nn.Module) -> set[str]:
    """Names of the adapter layers in ``model``: their children are adapter internals, never targets."""
    return {name for name, module in model.named_modules() if name and is_adapter_layer(module)}


def is_all_linear(target_modules: object) -> bool:
    """The "all-linear" shorthand, in any letter case, as PEFT reads it."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def name_matches(name: str, patterns: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches by equality or dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The block index in a name like ``model.layers.3.self_attn.q_proj`` (None when absent)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or DEFAULT_LAYERS_PATTERNS)
    for pattern in patterns:
        match = re.match(rf"(?:.*\.)?{pattern}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Full names of the output embedding (lm_head) and classifier heads, which all-linear skips."""
    heads: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if (output is not None and module is output) or name.rsplit(".", 1)[-1] in CLASSIFIER_HEAD_NAMES:
            heads.add(name)
    return heads


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def find_targets(
    model: nn.Module,
    target_modules: str | list[str],
    *,
    exclude_modules: str | list[str] | None = None,
    layers_to_transform: int | list[int] | None = None,
    layers_pattern: str | list[str] | None = None,
    skip_inside: Iterable[str] = (),
    skip: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Names of the modules to adapt, in model order.

    Adapter layers already in ``model`` are seen through (see the module docstring): a wrapped layer is
    matched by its own name and typed by its base layer, and nothing inside an adapter layer is a target.

    Args:
        skip_inside: more names of wrapper layers whose children are never targets themselves (adapter
            layers in ``model`` are found without it).
        skip: names (list rule) that are not targets, nor is anything inside them (modules_to_save).

    Raises:
        ValueError: when nothing matches; the message lists the model's closest module names.
    """
    inside = tuple(n + "." for n in {*skip_inside, *adapter_layer_names(model)})
    skip = list(skip)
    all_linear = is_all_linear(target_modules)
    heads = output_head_names(model) if all_linear else set()
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    found = []
    for name, module in model.named_modules():
        if not name or name.startswith(inside) or (skip and _is_or_is_inside(name, skip)):
            continue
        if all_linear:
            if not is_linear_like(base_of(module)) or name in heads:
                continue
        elif not name_matches(name, target_modules):
            continue
        if exclude_modules and name_matches(name, exclude_modules):
            continue
        if layers_to_transform is not None and layer_index(name, layers_pattern) not in layers_to_transform:
            continue
        found.append(name)
    if not found:
        raise ValueError(no_match_message(model, target_modules))
    return found


def _is_or_is_inside(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    return any(name_matches(".".join(parts[: i + 1]), patterns) for i in range(len(parts)))


def no_match_message(model: nn.Module, target_modules: str | list[str]) -> str:
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w.rsplit(".", 1)[-1], leaves, 5, 0.3)})
    hint = f" Closest module names in this model: {close}." if close else ""
    return (
        f"target_modules={target_modules!r} matched no module of {type(model).__name__}.{hint} "
        f"Module names available: {leaves[:40]}{' ...' if len(leaves) > 40 else ''}"
    )


def resolve_pattern(patterns: dict[str, object], name: str, default: object) -> object:
    """rank_pattern / alpha_pattern lookup: the first key that matches the end of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
