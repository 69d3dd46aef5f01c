"""Swap a model's linear layers for quantized ones, in place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .linear import Linear4bit, Linear8bit


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """``lm_head`` matches ``lm_head`` and ``model.lm_head``; ``mlp`` matches everything under a ``.mlp.``."""
    parts = name.split(".")
    return any(name == p or name.endswith("." + p) or p in parts for p in patterns)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, bits: int = 4, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                   double_quant: bool = True, skip_modules: Iterable[str] | None = None,
                   modules: Iterable[str] | None = None) -> nn.Module:
    """Replace linear layers by :class:`Linear4bit` (NF4) or :class:`Linear8bit` (int8), in place.

    By default every ``nn.Linear`` (and transformers ``Conv1D``, as in GPT-2) is quantized except the output head
    (``model.get_output_embeddings()``), as QLoRA and transformers' bitsandbytes integration do. Weights of any
    size are accepted: a short last block is padded, never refused. Meta-device layers become empty shells
    (see :func:`deltatune.quant.load_quantized`).

    Args:
        model: any ``nn.Module``.
        bits: 4 (NF4) or 8 (row-wise int8).
        compute_dtype: matmul dtype of the new layers; None uses the input's dtype.
        blocksize: NF4 values per absmax (4-bit only).
        double_quant: quantize the absmax values too (4-bit only).
        skip_modules: names (or name components, e.g. ``"lm_head"``) to leave in float.
        modules: quantize exactly these module names instead of all linear layers; each must be quantizable.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: for bits other than 4 or 8, a name in ``modules`` that does not exist, or one that names a
            layer that cannot be quantized (an Embedding, a Conv2d, ...), before anything is changed.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    skip = list(skip_modules or ())
    named = dict(model.named_modules())
    if modules is not None:
        chosen = list(modules)
        for name in chosen:
            if name not in named:
                raise ValueError(f"no module named {name!r} in {type(model).__name__}")
            if not _quantizable(named[name]):
                raise ValueError(f"cannot quantize {name!r} to {bits} bits: it is a {type(named[name]).__name__}; "
                                 "only nn.Linear and transformers Conv1D layers can be quantized")
    else:
        head = _output_head(model)
        chosen = [n for n, m in named.items() if n and _quantizable(m) and m is not head]
    for name in chosen:
        if _matches(name, skip):
            continue
        layer = named[name]
        if bits == 4:
            new = Linear4bit.from_linear(layer, compute_dtype, blocksize, double_quant)
        else:
            new = Linear8bit.from_linear(layer, compute_dtype)
        _set_submodule(model, name, new)
    return model
