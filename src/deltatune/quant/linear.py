"""`Linear4bit` and `Linear8bit`: frozen quantized linear layers that LoRA (or any adapter) can sit on.

Both hold their weight as a quantized module (`Weight4bit` / `Int8Weight`) in ``self.weight`` and a float ``bias``.
The forward dequantizes the whole weight into the compute dtype and calls one matmul; the backward gives a
gradient to the input (and bias) only and dequantizes again instead of keeping the float weight alive between
forward and backward: per layer that saves out*in*2..4 bytes of activation memory for a ~1 ms re-dequantization.

On CPU the dequantized NF4 weight is written into a per-thread scratch buffer reused by every layer. A fresh
multi-MiB tensor per call is handed back to the OS by glibc when freed and page-faulted in again by the next
layer, which costs as much as the dequantization itself; the buffer only lives while one matmul reads it, and
nothing keeps it (the autograd Function keeps only the small block scales). CUDA's caching allocator already
reuses blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from torch import nn

from ..targets import is_gpt2_conv1d
from .int8 import Int8Weight, quantize_int8
from .nf4 import Weight4bit, quantize_4bit

QuantizedWeight = Weight4bit | Int8Weight


class _Scratch(threading.local):
    """Per-thread growable buffers, one per (dtype, device); ``take`` returns a view of the first ``numel``."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get((dtype, device))
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # a normal tensor, writable whether or not inference mode is on
                buf = self.buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


_SCRATCH = _Scratch()


def _transient_weight(weight: QuantizedWeight, dtype: torch.dtype, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight for one matmul, in the scratch buffer when that pays (4-bit on CPU); never keep it."""
    if isinstance(weight, Weight4bit):
        return weight.dequantize(dtype, scratch=_SCRATCH.take if weight.device.type == "cpu" else None, scales=scales)
    return weight.dequantize(dtype)


def _scales(weight: QuantizedWeight) -> torch.Tensor | None:
    """A 4-bit weight's fp32 block scales in a fresh tensor (kept for the backward); None for int8."""
    if not isinstance(weight, Weight4bit):
        return None
    index = _SCRATCH.take(weight.absmax.numel(), torch.int32, weight.device) if weight.device.type == "cpu" else None
    return weight.absmax_fp32(index=index)


class _DequantLinear(torch.autograd.Function):
    """``y = x @ W^T + b`` with W rebuilt from its quantized form in forward and again in backward.

    For a 4-bit weight the forward keeps the fp32 block scales (one value per 64 weights, 1/64 of the fp32 weight's
    size) for the backward, which then skips the handful of small ops that undo double quantization.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        ctx.weight = weight  # the module, not a tensor: no float weight is saved for backward
        ctx.has_bias = bias is not None
        ctx.scales = _scales(weight)
        return nn.functional.linear(x, _transient_weight(weight, x.dtype, ctx.scales), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:  # noqa: ANN001
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _transient_weight(ctx.weight, grad.dtype, ctx.scales)  # (..., out) @ (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_b


def _forward(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
             compute_dtype: torch.dtype | None) -> torch.Tensor:
    dtype = compute_dtype or x.dtype
    b = bias.to(dtype) if bias is not None else None
    if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
        out = _DequantLinear.apply(x.to(dtype), weight, b)
    else:
        out = nn.functional.linear(x.to(dtype), _transient_weight(weight, dtype), b)
    return out.to(x.dtype)


def _float_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of an nn.Linear or a transformers Conv1D (which stores it transposed)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if is_gpt2_conv1d(layer):
        return layer.weight.t()
    raise ValueError(f"only nn.Linear and transformers Conv1D layers can be quantized, got {type(layer).__name__}")


class _QuantizedLinear(nn.Module):
    """What Linear4bit and Linear8bit share: the attributes adapters read, the forward and the repr."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype | None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"{type(self).__name__} needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.compute_dtype = compute_dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight in ``dtype`` (default: the original weight's dtype); never needs grad."""
        return self.weight.dequantize(dtype)

    def reusable_state(self) -> torch.Tensor | None:
        """What rebuilding the weight needs that a forward can compute once and its backward reuse (a 4-bit
        weight's fp32 block scales, 1/64 of the float weight's size); None for int8. For :meth:`transient_weight`."""
        return _scales(self.weight)

    def transient_weight(self, dtype: torch.dtype, state: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) float weight for one matmul, for a fused layer above this one (LoRA's).

        On CPU a 4-bit weight is written into a per-thread scratch buffer that the next call overwrites: use the
        result at once and never keep it. ``state`` is this layer's :meth:`reusable_state`, or None to recompute it.
        """
        return _transient_weight(self.weight, dtype, state)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype = torch.float32, deltas: Iterable[torch.Tensor] = ()) -> nn.Linear:
        """A float ``nn.Linear`` of ``dtype`` holding the dequantized weight (plus ``deltas``, e.g. LoRA updates,
        added in fp32 before the one rounding to ``dtype``) and this layer's bias: what export and merge produce."""
        weight = self.dequantized_weight(torch.float32)
        for delta in deltas:
            weight = weight + delta.float()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                           dtype=dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(x, self.weight, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"compute_dtype={self.compute_dtype}"


class Linear4bit(_QuantizedLinear):
    """A linear layer whose weight is NF4 (QLoRA) or FP4: 4.13 bits per weight, matmul in ``compute_dtype``.

    Attributes:
        weight: the :class:`Weight4bit`; ``weight.shape == (out_features, in_features)``, ``weight.dtype`` is the
            dtype the float weight had, ``weight.device`` where the codes live.
        bias: float ``nn.Parameter`` or None.
        compute_dtype: dtype of the matmul; None means the input's dtype. The output has the input's dtype.
    """

    def __init__(self, weight: Weight4bit, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__(weight, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                    double_quant: bool = True, quant_type: str = "nf4") -> Linear4bit:
        """Quantize an ``nn.Linear`` (or transformers ``Conv1D``) to NF4 (or FP4); its bias Parameter is reused as is.

        A layer on the meta device gives an empty shell of the right sizes, to be filled by a streaming loader.
        """
        w = _float_weight(linear)
        if w.is_meta:
            weight = Weight4bit.empty(tuple(w.shape), w.dtype, blocksize, double_quant, quant_type=quant_type)
        else:
            weight = quantize_4bit(w, blocksize, double_quant, quant_type)
        return cls(weight, linear.bias, compute_dtype)


class Linear8bit(_QuantizedLinear):
    """A linear layer whose weight is row-wise int8 (LLM.int8() without the outlier split).

    Same attributes and contract as :class:`Linear4bit`, with an :class:`Int8Weight` as ``weight``.
    """

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__(weight, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | None = None) -> Linear8bit:
        """Quantize an ``nn.Linear`` (or transformers ``Conv1D``) to int8; a meta layer gives an empty shell."""
        w = _float_weight(linear)
        if w.is_meta:
            weight = Int8Weight(torch.empty(tuple(w.shape), dtype=torch.int8, device="meta"),
                                torch.empty(w.shape[0], device="meta"), w.dtype)
        else:
            weight = quantize_int8(w)
        return cls(weight, linear.bias, compute_dtype)
