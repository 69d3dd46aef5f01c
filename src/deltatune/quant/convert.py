"""Swap a model's linear layers for quantized ones, in place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..adapter_layer import replace_module
from ..finite import all_finite
from ..targets import is_gpt2_conv1d
from .int8 import quantize_int8
from .linear import Linear4bit, Linear8bit, _float_weight
from .nf4 import code_table, quantize_4bit

QUANTIZE_NAMES = ("nf4", "fp4", "int8")


def quantize_arguments(name: str) -> dict[str, int | str]:
    """The ``bits`` and ``quant_type`` that a user-facing name ("nf4", "fp4" or "int8") stands for.

    The command line and run files speak in these names; the functions here take the two arguments.
    """
    if name not in QUANTIZE_NAMES:
        raise ValueError(f"unknown quantization {name!r}; expected one of {', '.join(QUANTIZE_NAMES)}")
    return {"bits": 8, "quant_type": "nf4"} if name == "int8" else {"bits": 4, "quant_type": name}


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module)


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


def quantize_model(model: nn.Module, bits: int = 4, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                   double_quant: bool = True, skip_modules: Iterable[str] | None = None,
                   modules: Iterable[str] | None = None, quant_type: str = "nf4") -> nn.Module:
    """Replace linear layers by :class:`Linear4bit` (NF4 or FP4) or :class:`Linear8bit` (int8), in place.

    By default every ``nn.Linear`` (and transformers ``Conv1D``, as in GPT-2) is quantized except the output head
    (``model.get_output_embeddings()``), as QLoRA and transformers' bitsandbytes integration do. Weights of any
    size are accepted: a short last block is padded, never refused. Meta-device layers become empty shells
    (see :func:`deltatune.quant.load_quantized`).

    Args:
        model: any ``nn.Module``.
        bits: 4 (NF4 / FP4) or 8 (row-wise int8).
        compute_dtype: matmul dtype of the new layers; None uses the input's dtype.
        blocksize: NF4 values per absmax (4-bit only).
        double_quant: quantize the absmax values too (4-bit only).
        skip_modules: names (or name components, e.g. ``"lm_head"``) to leave in float.
        modules: quantize exactly these module names instead of all linear layers; each must be quantizable.
        quant_type: "nf4" (QLoRA's choice) or "fp4" (4-bit only).

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: for bits other than 4 or 8, an unknown quant_type, a name in ``modules`` that does not exist,
            one that names a layer that cannot be quantized (an Embedding, a Conv2d, ...), or a weight that holds
            NaN or Inf (naming its layer); before any change.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    code_table(quant_type)  # refuses an unknown type before anything changes
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
    chosen = [name for name in chosen if not _matches(name, skip)]
    _refuse_non_finite_layers(named, chosen)
    for name in chosen:
        layer = named[name]
        if bits == 4:
            new = Linear4bit.from_linear(layer, compute_dtype, blocksize, double_quant, quant_type)
        else:
            new = Linear8bit.from_linear(layer, compute_dtype)
        replace_module(model, name, new)
    return model


@torch.no_grad()
def _refuse_non_finite_layers(named: dict[str, nn.Module], chosen: list[str]) -> None:
    """One ``isfinite`` pass per weight before any layer is replaced, so a damaged weight leaves the model as it
    was and the error names every such layer (the quantizers would refuse it too, but midway through the model)."""
    weights = {name: _float_weight(named[name]) for name in chosen}
    bad = [name for name, w in weights.items() if not all_finite(w)]
    if bad:
        raise ValueError(f"cannot quantize: the weights of {bad} hold NaN or Inf values (a damaged checkpoint, or "
                         "training that diverged); quantizing would make these layers output NaN. Nothing was "
                         "changed.")


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every Linear4bit / Linear8bit by an ``nn.Linear`` of ``dtype``, in place (for export).

    This is the only way codes become floats again: nothing is ever merged into 4/8-bit codes.
    """
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bit))]
    for name, layer in quantized:
        replace_module(model, name, layer.to_linear(dtype))
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


@torch.no_grad()
def requantization_error(model: nn.Module, bits: int = 4, blocksize: int = 64,
                         quant_type: str = "nf4") -> dict[str, float]:
    """How much quantizing a (merged, float) model's linear layers again would change their weights.

    Returns max abs error and the relative RMS error (||W - Q(W)|| / ||W||) over all the layers that
    ``quantize_model`` would quantize, so a user can judge before shipping a re-quantized export.
    """
    head = _output_head(model)
    squared_error = squared_norm = 0.0
    max_abs = 0.0
    for _, layer in model.named_modules():
        if not _quantizable(layer) or layer is head:
            continue
        weight = _float_weight(layer).detach().float()
        if bits == 4:
            again = quantize_4bit(weight, blocksize, True, quant_type).dequantize(torch.float32)
        else:
            again = quantize_int8(weight).dequantize(torch.float32)
        diff = again - weight
        squared_error += float(diff.square().sum())
        squared_norm += float(weight.square().sum())
        max_abs = max(max_abs, float(diff.abs().max()))
    return {"max_abs_error": max_abs, "relative_rms_error": (squared_error / max(squared_norm, 1e-30)) ** 0.5}
