"""LoRA initialisations that start from the base weight: PiSSA, OLoRA and LoftQ, and the conversion of a PiSSA or
OLoRA adapter back to plain LoRA.

Why a file of its own: these modes do not only choose A and B, they change the frozen base so that the model's
output at step 0 is still the pretrained one (or, for LoftQ, as close to it as a quantized base allows):

- PiSSA (Meng et al. 2024): B A holds the top-r singular triplets of W, and the base keeps the residual
  ``W - s B A``; training then moves the principal directions. ``pissa_niter_K`` finds them with a randomised
  SVD of K subspace iterations (``torch.svd_lowrank``), much faster on wide layers.
- OLoRA (Büyükakyüz 2024): B and A are the first r columns / rows of W's QR decomposition; the base keeps
  ``W - s B A``.
- LoftQ (Li et al. 2023): alternate ``Q = quant(W - s B A)`` and ``s B A = SVD_r(W - deq(Q))``, so the adapter
  starts by absorbing the quantization error. Here Q is deltatune's own NF4 (PEFT's ``compress_statistics=False``
  bitsandbytes NF4, bit for bit) or row-wise int8, and the base layer *becomes* that quantized layer: the memory
  saving is real, where PEFT leaves a float weight holding ``deq(Q)``.

PEFT's layouts and arithmetic are followed (same A, B and residual for PiSSA and OLoRA, same A, B and Q for LoftQ
when ``lora_alpha == r``); two things differ on purpose: the orientation of GPT-2's Conv1D weight is honoured for
OLoRA and LoftQ (PEFT decomposes the stored (in, out) matrix there), and LoftQ divides by the LoRA scaling so that
``s B A`` is the low-rank residual whatever ``lora_alpha`` is (PEFT's A and B ignore the scaling).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from ..quant.bnb import bnb_weight_kind
from ..targets import is_gpt2_conv1d, is_quantized

BASE_INITS = ("pissa", "olora", "loftq")
LOFTQ_BITS = (4, 8)


def base_init(mode: Any) -> str | None:
    """"pissa" (also for "pissa_niter_K"), "olora" or "loftq" when ``init_lora_weights`` changes the base, else None."""
    if not isinstance(mode, str):
        return None
    if mode == "pissa" or pissa_iterations(mode) is not None:
        return "pissa"
    return mode if mode in ("olora", "loftq") else None


def pissa_iterations(mode: str) -> int | None:
    """K of "pissa_niter_K" (a randomised SVD with K subspace iterations), else None."""
    prefix = "pissa_niter_"
    if isinstance(mode, str) and mode.startswith(prefix) and mode[len(prefix):].isdigit():
        return int(mode[len(prefix):])
    return None


def is_pissa_niter_typo(mode: Any) -> bool:
    """ "pissa_niter_" followed by something that is not a number of iterations."""
    return isinstance(mode, str) and mode.startswith("pissa_niter_") and pissa_iterations(mode) is None


def check_loftq_config(value: Any) -> dict[str, int]:
    """PEFT's ``loftq_config`` (a LoftQConfig or a dict) as a checked dict."""
    if not isinstance(value, dict):
        value = {"loftq_bits": getattr(value, "loftq_bits", None), "loftq_iter": getattr(value, "loftq_iter", None)}
    if not value:
        raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. LoftQConfig(loftq_bits=4, loftq_iter=1): "
                         "the bits of the quantized base the adapter is to absorb the error of.")
    bits, iters = value.get("loftq_bits", 4), value.get("loftq_iter", 1)
    if bits not in LOFTQ_BITS or isinstance(bits, bool):
        raise ValueError(f"loftq_bits must be 4 (NF4) or 8 (int8), got {bits!r}; deltatune has no 2-bit quantizer.")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"loftq_iter must be a positive integer (alternating rounds, usually 1-5), got {iters!r}.")
    return {"loftq_bits": bits, "loftq_iter": iters}


def check_base_init_fits(base: nn.Module, kind: str, r: int, mode: Any, where: str, has_adapters: bool) -> None:
    """Refuse, before anything changes, a base-changing init this layer cannot take (with what to do instead).

    An embedding takes PiSSA / OLoRA as the plain init, as PEFT does; convolutions and LoftQ on embeddings are
    refused (PEFT fails on the first and deltatune quantizes linear layers only).
    """
    method = base_init(mode)
    if method is None or (kind == "embedding" and method != "loftq"):
        return
    if kind != "linear":
        raise ValueError(f"{where}: init_lora_weights={mode!r} works on linear layers (nn.Linear, transformers "
                         f"Conv1D), not on a {type(base).__name__}; leave this layer out of target_modules or use "
                         "init_lora_weights=True.")
    if is_quantized(base) or bnb_weight_kind(base) is not None:
        what = ("load the model unquantized: LoftQ quantizes the layers it adapts itself" if method == "loftq" else
                "initialise on the float model, then quantize the residual base (PiSSA's QLoRA recipe)")
        raise ValueError(f"{where}: init_lora_weights={mode!r} needs the float weight, but this layer is "
                         f"quantized ({type(base).__name__}); {what}.")
    if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{where}: init_lora_weights={mode!r} needs a float weight, got {base.weight.dtype}.")
    width = min(base.weight.shape)
    if r > width:
        raise ValueError(f"{where}: init_lora_weights={mode!r} takes r singular vectors (or QR columns) of a "
                         f"{tuple(base.weight.shape)} weight, which has {width}; got r={r}. Choose r <= {width}.")
    if method == "loftq" and has_adapters:
        raise ValueError(f"{where}: LoftQ replaces the base layer by a quantized one, which would change the "
                         "adapters it already has; add the LoftQ adapter first (or to a fresh model).")


def _weight_out_in(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in) in fp32 (GPT-2's Conv1D stores (in, out))."""
    weight = base.weight.detach()
    return (weight.t() if is_gpt2_conv1d(base) else weight).to(torch.float32)


@torch.no_grad()
def _add_to_base(base: nn.Module, delta: torch.Tensor) -> None:
    """base weight += delta (out, in), in place, computed in fp32 and rounded once to the weight's dtype."""
    weight = base.weight.data
    new = _weight_out_in(base) + delta
    weight.copy_(new.t() if is_gpt2_conv1d(base) else new)


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, iterations: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``s B A`` = the top-r part of ``weight``'s SVD, its singular values split evenly between A and B."""
    if iterations is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, q=r, niter=iterations)
        vh = v.t()
    root = (s / scaling).sqrt()
    return root[:, None] * vh, u * root[None, :]


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = the first r rows of R and columns of Q in ``weight = Q R``."""
    q, upper = torch.linalg.qr(weight)
    return upper[:r].contiguous(), q[:, :r].contiguous()


def _quantize(weight: torch.Tensor, bits: int) -> nn.Module:
    from ..quant import quantize_4bit, quantize_int8  # (quant imports targets; keep this module light)

    return quantize_4bit(weight, 64, double_quant=False) if bits == 4 else quantize_int8(weight)


def loftq_factors(weight: torch.Tensor, r: int, scaling: float, bits: int, iterations: int
                  ) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(A, B, Q): ``iterations`` rounds of Q = quant(W - s B A), s B A = SVD_r(W - deq(Q))."""
    residual = weight
    for step in range(iterations):
        quantized = _quantize(residual, bits)
        a, b = pissa_factors(weight - quantized.dequantize(torch.float32), r, scaling)
        if step + 1 < iterations:
            residual = weight - scaling * (b @ a)
    return a, b, quantized


@torch.no_grad()
def initialize(layer: nn.Module, name: str, mode: str, loftq_config: Any = None) -> None:
    """Set adapter ``name``'s A and B of LoRA layer ``layer`` from its base weight, and change the base to match.

    PiSSA / OLoRA subtract ``s B A`` from the base weight in place; LoftQ swaps the base for the quantized layer.
    """
    method = base_init(mode)
    if layer.kind == "embedding" and method != "loftq":
        return
    base, r, scaling = layer.base_layer, layer.r[name], layer.scaling[name]
    weight = _weight_out_in(base)
    if method == "loftq":
        options = check_loftq_config(loftq_config)
        a, b, quantized = loftq_factors(weight, r, scaling, options["loftq_bits"], options["loftq_iter"])
        quantized.dtype = base.weight.dtype
        layer.swap_base(_quantized_layer(base, quantized))
    elif method == "olora":
        a, b = olora_factors(weight, r)
        _add_to_base(base, -((scaling * b) @ a))  # (PEFT's order of rounding)
    else:
        a, b = pissa_factors(weight, r, scaling, pissa_iterations(mode))
        _add_to_base(base, -((scaling * b) @ a))  # (PEFT's order of rounding)
    layer.lora_A[name].weight.copy_(a)
    layer.lora_B[name].weight.copy_(b)


def _quantized_layer(base: nn.Module, weight: nn.Module) -> nn.Module:
    from ..quant import Linear4bit, Linear8bit

    cls = Linear4bit if hasattr(weight, "packed") else Linear8bit
    return cls(weight, base.bias)


@torch.no_grad()
def undo(layer: nn.Module, name: str, mode: Any) -> None:
    """Give a PiSSA / OLoRA base its ``s B A`` back (an ``attach`` that failed half way; exact up to rounding).

    LoftQ needs nothing: the float layer it replaced is put back whole by the caller.
    """
    if base_init(mode) in ("pissa", "olora") and layer.kind != "embedding" and name in layer.lora_A:
        b, a = layer.lora_B[name].weight.float(), layer.lora_A[name].weight.float()
        _add_to_base(layer.base_layer, layer.scaling[name] * (b @ a))


def convert_to_plain_lora(config: Any, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                          where: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """A trained PiSSA / OLoRA adapter as a plain LoRA adapter for the *original* base weight, of rank 2r.

    ``W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0]``: A and B get the initial ones stacked on, the
    rank doubles and alpha with it so that the scaling stays (times sqrt(2) with rsLoRA). ``initial`` holds the
    adapter saved right after initialisation (PEFT's ``path_initial_model_for_weight_conversion``).
    """
    lora_keys = [k for k in tensors if _rank_axis(k) is not None]
    missing = sorted(k for k in lora_keys if k not in initial)
    if missing or not lora_keys:
        raise ValueError(f"{where} is not the initial state of this adapter: it lacks {missing[:3] or 'LoRA tensors'}"
                         ". Save the adapter right after get_peft_model() and before training, and pass that folder.")
    out = dict(tensors)
    for key in lora_keys:
        axis, now, start = _rank_axis(key), tensors[key], initial[key]
        if start.shape != now.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(start.shape)} there and {tuple(now.shape)} here; it "
                             "is the initial state of another adapter.")
        start = start.to(now.dtype)
        out[key] = torch.cat([now, start if axis == 0 else -start], dim=axis)
    factor = math.sqrt(2) if config.use_rslora else 2
    config = type(config).from_dict(config.to_dict())  # a copy: the live adapter keeps its settings
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= factor
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: factor * v for k, v in config.alpha_pattern.items()}
    return config, out


def _rank_axis(key: str) -> int | None:
    """The axis of a LoRA tensor that has the rank: 0 for A (r, in), 1 for B (out, r), None for anything else."""
    parts = key.split(".")
    if "lora_A" in parts or "lora_embedding_A" in parts:
        return 0
    if "lora_B" in parts or "lora_embedding_B" in parts:
        return 1
    return None


def read_initial_adapter(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the adapter saved right after initialisation, for :func:`convert_to_plain_lora`."""
    from ..formats.peft import read_adapter_weights

    if not os.path.isdir(path):
        raise ValueError(f"path_initial_model_for_weight_conversion={os.fspath(path)!r} is not a folder; pass the "
                         "folder the adapter was saved to right after get_peft_model(), before training.")
    return read_adapter_weights(path)
