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
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from ..func_transforms import func_transform_active
from ..targets import is_gpt2_conv1d
from .int8 import Int8Weight, quantize_int8
from .nf4 import DecodePlan, Weight4bit, quantize_4bit

QuantizedWeight = Weight4bit | Int8Weight


class _Scratch(threading.local):
    """Per-thread growable buffers, one per (dtype, device), and the decode plans of 4-bit weights into them.

    ``take`` returns a view of a buffer's first ``numel`` elements; growing a buffer drops every plan (their views
    point into the old one). Plans are keyed weakly by weight, so a freed model leaves none behind.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self.plans: weakref.WeakKeyDictionary[Weight4bit, DecodePlan] = weakref.WeakKeyDictionary()

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get((dtype, device))
        if buf is None or buf.numel() < numel:
            self.plans.clear()
            with torch.inference_mode(False):  # a normal tensor, writable whether or not inference mode is on
                buf = self.buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def plan(self, weight: Weight4bit, dtype: torch.dtype) -> DecodePlan:
        """The kept plan that decodes ``weight`` into this thread's buffers, made anew when it no longer fits."""
        plan = self.plans.get(weight)
        if plan is None or not plan.fits(weight, dtype):
            plan = DecodePlan(weight, dtype, self.take)
            self.plans[weight] = plan
        return plan


_SCRATCH = _Scratch()


def _transient_weight(weight: QuantizedWeight, dtype: torch.dtype, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight for one matmul, in the scratch buffer when that pays (4-bit on CPU); never keep it."""
    if isinstance(weight, Weight4bit):
        if weight.device.type == "cpu" and not torch.compiler.is_compiling():
            return _SCRATCH.plan(weight, dtype).run(scales)
        return weight.dequantize(dtype, scales=scales)
    return weight.dequantize(dtype)


def _backward_weight(weight: QuantizedWeight, dtype: torch.dtype, scales: torch.Tensor | None) -> torch.Tensor:
    """:func:`_transient_weight` for a backward. Under ``backward(create_graph=True)`` autograd keeps what the
    backward multiplies by, so the weight is then copied out of the scratch buffer the next layer overwrites."""
    float_weight = _transient_weight(weight, dtype, scales)
    return float_weight.clone() if torch.is_grad_enabled() else float_weight


def _weight_and_scales(weight: QuantizedWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A forward's transient float weight and, for 4-bit, its fp32 block scales in a fresh tensor for the backward."""
    if not isinstance(weight, Weight4bit) or torch.compiler.is_compiling():  # (a graph: plain ops, see dequantize)
        return weight.dequantize(dtype), None
    if weight.device.type != "cpu":
        scales = weight.absmax_fp32()
        return weight.dequantize(dtype, scales=scales), scales
    plan = _SCRATCH.plan(weight, dtype)
    scales = plan.block_scales()
    return plan.run(scales), scales.clone()


class _DequantLinear(torch.autograd.Function):
    """``y = x @ W^T + b`` with W rebuilt from its quantized form in forward and again in backward.

    For a 4-bit weight the forward keeps the fp32 block scales (one value per 64 weights, 1/64 of the fp32 weight's
    size) for the backward, which then skips the handful of small ops that undo double quantization.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        ctx.weight = weight  # the module, not a tensor: no float weight is saved for backward
        ctx.has_bias = bias is not None
        float_weight, ctx.scales = _weight_and_scales(weight, x.dtype)
        return nn.functional.linear(x, float_weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:  # noqa: ANN001
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _backward_weight(ctx.weight, grad.dtype, ctx.scales)  # (..., out) @ (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_b


def _forward(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
             compute_dtype: torch.dtype | None) -> torch.Tensor:
    dtype = compute_dtype or x.dtype
    b = bias.to(dtype) if bias is not None else None
    if func_transform_active():  # torch.func / forward AD: plain ops, on a weight of its own (autograd keeps it)
        out = nn.functional.linear(x.to(dtype), weight.dequantize(dtype), b)
    elif torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
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

    def transient_weight_and_state(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For a forward fused above this layer (LoRA's): the (out, in) float weight for one matmul, and what its
        backward can reuse to rebuild it faster (a 4-bit weight's fp32 block scales, 1/64 of the float weight's
        size; None for int8).

        On CPU a 4-bit weight is written into a per-thread scratch buffer that the next call overwrites: use the
        weight at once and never keep it; keep the state.
        """
        return _weight_and_scales(self.weight, dtype)

    def transient_weight(self, dtype: torch.dtype, state: torch.Tensor | None = None) -> torch.Tensor:
        """The same float weight again, for that backward; ``state`` from :meth:`transient_weight_and_state`.
        Under ``backward(create_graph=True)`` it is a copy that autograd may keep."""
        return _backward_weight(self.weight, dtype, state)

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
