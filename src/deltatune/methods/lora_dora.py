"""DoRA: weight-decomposed LoRA, W' = m * (W + s B A) / ||W + s B A||_c (``LoraConfig(use_dora=True)``).

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. (5): the adapted weight is split into a
magnitude ``m`` (one trained value per output; ``lora_magnitude_vector`` in PEFT's files) and a direction, the
LoRA-updated weight scaled to unit norm per output. ``m`` starts as ``||W + s B A||``, so an adapter starts out
equal to plain LoRA (and to the base model with B = 0). As in the paper's section 4.3 and in PEFT, the norm is
treated as a constant in backward (detached): only ``m``, A and B get gradients.

What forward computes is PEFT's, term for term (so files and outputs move both ways): with base output
``y0 = W x + b`` and ``f = m / ||W + s B A||``, ``y = y0 + (f - 1) (W x') + f s B A x'`` where ``x'`` is
``dropout(x)`` when dropout is on in training, else ``x`` (then ``y = f (W x + s B A x) + b``). An embedding
scales its output instead: ``y = f (y0 + s B A x)`` per embedding dimension. Several active adapters apply in
turn, each on the previous one's output, as in PEFT.

This file holds the parts ``methods/lora.py``'s ``LoraLayer`` calls: the magnitude's init, the weight norm,
the module-by-module forward, merge / unmerge steps, and ``FusedDoraLinear``, the training path of a frozen
nn.Linear or quantized base (one autograd node that never forms W + s B A).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.bnb import bnb_requantize, bnb_weight_kind
from .lora_fused import (
    _frozen_weight,
    _frozen_weight_and_state,
    fused_gradients,
    keep_input,
    kept_input,
    low_rank_then_base,
    skip_input,
    unflattened_empty,
)
from .lora_inputs import saved_tensor_hooks_active

if TYPE_CHECKING:
    from .lora import LoraLayer

# rows whose ||W + sBA||^2 is this small against ||W||^2 are recomputed from W + sBA itself (see linear_weight_norm)
_CANCELLATION = 1e-2


class Magnitude(nn.Module):
    """One DoRA adapter's m, as ``weight`` (PEFT's parameter name too: ``lora_magnitude_vector.<adapter>.weight``;
    its files drop the ``.<adapter>.weight``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def check_dora_fits(base: nn.Module, where: str) -> None:
    """Refuse DoRA where its weight norm does not exist, before anything changes.

    A grouped convolution's B A mixes every input channel while its weight holds only a group's, so there is no
    ``W + s B A`` to take the norm of (PEFT computes one of a mis-shaped product there and gives meaningless
    outputs).
    """
    groups = getattr(base, "groups", 1) if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else 1
    if groups > 1:
        raise ValueError(
            f"{where}: DoRA (use_dora=True) cannot adapt a {type(base).__name__} with groups={groups}: its magnitude "
            "is the norm of W + s*B*A per output channel, and B*A mixes all input channels, which a grouped weight "
            "cannot hold. Use plain LoRA here (use_dora=False) or leave this layer out of target_modules."
        )


def _out_axis(layer: LoraLayer) -> int:
    """The axis of the stored base weight that indexes DoRA's magnitude: the output features / channels, or the
    embedding dimension (an embedding's weight is (num_embeddings, dim); GPT-2's Conv1D stores (in, out))."""
    return 1 if layer.kind == "embedding" or layer.fan_in_fan_out else 0


def _along_out(layer: LoraLayer, vector: torch.Tensor) -> torch.Tensor:
    """A per-output vector shaped to broadcast over the stored base weight."""
    shape = [1] * layer.base_layer.weight.dim() if layer.kind != "linear" else [1, 1]
    shape[_out_axis(layer)] = -1
    return vector.reshape(shape)


def linear_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """``||W + s B A||`` per row (out,), in fp32 (fp64 for fp64 inputs), without forming ``W + s B A``.

    ``||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T``: one (out x in) @ (in x r) product instead of an
    out x in matrix built, added to and reduced. Rows where the sum cancels (the update nearly removes the row)
    are recomputed directly, so the rounding stays that of the direct formula.

    Args:
        weight: the (out, in) base weight; lora_a: (r, in); lora_b: (out, r).
    """
    with torch.no_grad():
        dtype = torch.promote_types(torch.promote_types(weight.dtype, lora_a.dtype), torch.float32)
        w, a, b = weight.to(dtype), lora_a.detach().to(dtype), lora_b.detach().to(dtype)
        if torch.compiler.is_compiling():  # a graph has no data-dependent row choice: the direct formula (PEFT's)
            return torch.linalg.vector_norm(w + scaling * (b @ a), dim=1)
        w_sq = torch.linalg.vector_norm(w, dim=1).square_()
        # row i of 2 s W A^T + s^2 B (A A^T), dotted with B_i: the cross and BA terms in one addmm and one vecdot
        # (each op costs ~10 us on CPU, once per adapted layer and step); A W^T is MKL's fast layout, read transposed
        terms = torch.addmm((a @ w.t()).t(), b, a @ a.t(), beta=2 * scaling, alpha=scaling * scaling)
        norm_sq = torch.linalg.vecdot(terms, b, dim=1).add_(w_sq)
        rows = (norm_sq < _CANCELLATION * w_sq).nonzero().flatten()
        norm = norm_sq.clamp_min_(0).sqrt_()
        if rows.numel():
            norm[rows] = torch.linalg.vector_norm(w[rows] + scaling * (b[rows] @ a), dim=1)
        return norm


def weight_norm(layer: LoraLayer, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``||W + s B A||`` per output (a flat vector), of the unmerged base weight ``W`` (``weight``, stored layout,
    when given; the layer's own otherwise), detached."""
    with torch.no_grad():
        if weight is None:
            weight = layer.base_weight()
        if layer.kind == "linear":
            oriented = weight.t() if layer.fan_in_fan_out else weight
            return linear_weight_norm(oriented, layer.lora_A[name].weight, layer.lora_B[name].weight,
                                      layer.scaling[name])
        summed = weight.float() + layer.delta_weight(name).detach().float()
        dims = [d for d in range(summed.dim()) if d != _out_axis(layer)]
        return torch.linalg.vector_norm(summed, dim=dims)


def init_magnitude(layer: LoraLayer, name: str) -> None:
    """m = ||W + s B A|| per output, so the adapter starts as plain LoRA would; shaped as PEFT stores it ((out,),
    (dim,) for an embedding, (1, out, 1, ...) for a convolution)."""
    norm = weight_norm(layer, name)
    if layer.kind == "conv":
        norm = norm.view(1, -1, *([1] * (layer.base_layer.weight.dim() - 2)))
    dtype = layer.lora_A[name].weight.dtype if name in layer.lora_A else layer.lora_embedding_A[name].dtype
    layer.lora_magnitude_vector[name] = Magnitude(norm.to(dtype))


def _flat_magnitude(layer: LoraLayer, name: str) -> torch.Tensor:
    return layer.lora_magnitude_vector[name].weight.reshape(-1)


def dora_forward(layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (the base output, plus any earlier adapter's) with DoRA adapter ``name`` applied, module by
    module (PEFT's formula; see the module docstring)."""
    dtype = result.dtype
    scaling = layer.scaling[name]
    magnitude = layer.lora_magnitude_vector[name].weight
    norm = weight_norm(layer, name)
    if layer.kind == "embedding":
        scale = magnitude / norm
        return (scale * result + scale * layer.lora_output(name, x)).to(dtype)
    lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    x = x.to(lora_a.weight.dtype)
    base = layer.base_layer
    if layer.training and not isinstance(dropout, nn.Identity):
        x = dropout(x)
        weight = layer.base_weight().to(x.dtype)
        if layer.kind == "conv":
            base_result = base._conv_forward(x, weight, None)  # the base convolution, its padding mode, no bias
        else:
            base_result = F.linear(x, weight.t() if layer.fan_in_fan_out else weight)
    else:
        bias = getattr(base, "bias", None)
        if bias is not None and layer.kind == "conv":
            bias = bias.view(1, -1, *([1] * (result.dim() - 2)))
        base_result = result if bias is None else result - bias
    scale = magnitude / norm.view(magnitude.shape)  # (out,), or (1, out, 1, ...) for a convolution
    lora_result = lora_b(lora_a(x)) * scaling
    return (result + (scale - 1) * base_result + scale * lora_result).to(dtype)


def dora_fused(layer: LoraLayer, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The training forward of a frozen nn.Linear / quantized base with one active DoRA adapter."""
    dropout = layer.lora_dropout[name]
    x_lora = None if isinstance(dropout, nn.Identity) or not layer.training else dropout(x)
    return FusedDoraLinear.apply(x, x_lora, layer.lora_A[name].weight, layer.lora_B[name].weight,
                                 layer.lora_magnitude_vector[name].weight, layer.base_layer, layer.scaling[name], dtype)


# ---- merging --------------------------------------------------------------------------------------


def _write_weight(layer: LoraLayer, new: torch.Tensor) -> None:
    base = layer.base_layer
    if bnb_weight_kind(base):
        bnb_requantize(base, new)
    else:
        base.weight.data.copy_(new.to(base.weight.dtype))


def merge_one(layer: LoraLayer, name: str, norm: torch.Tensor, safe_merge: bool) -> None:
    """W <- m / ||W0 + s B A|| * (W + s B A), where ``norm`` was taken of the unmerged weight W0 (W may hold
    adapters merged before this one); ``norm`` is kept so that :func:`unmerge_one` can undo it."""
    factor = _along_out(layer, _flat_magnitude(layer, name).detach().float() / norm)
    new = factor * (layer.base_weight().float() + layer.delta_weight(name).detach().float())
    if safe_merge and not torch.isfinite(new).all():
        raise ValueError(f"Merging DoRA adapter {name!r} would put NaN/Inf into the weight; nothing merged.")
    _write_weight(layer, new)
    layer.dora_norms[name] = norm


def unmerge_one(layer: LoraLayer, name: str) -> None:
    """W <- W / (m / ||W0 + s B A||) - s B A, with the norm kept at merge (exact up to float rounding)."""
    factor = _along_out(layer, _flat_magnitude(layer, name).detach().float() / layer.dora_norms.pop(name))
    _write_weight(layer, layer.base_weight().float() / factor - layer.delta_weight(name).detach().float())


def merged_weight(layer: LoraLayer, names: list[str]) -> torch.Tensor:
    """The fp32 base weight with adapters ``names`` (DoRA or plain) merged in turn, without writing it."""
    base = layer.base_weight().float()
    weight = base
    for name in names:
        delta = layer.delta_weight(name).detach().float()
        if name in layer.lora_magnitude_vector:
            factor = _along_out(layer, _flat_magnitude(layer, name).detach().float() / weight_norm(layer, name, base))
            weight = factor * (weight + delta)
        else:
            weight = weight + delta
    return weight


# ---- the fused training path ----------------------------------------------------------------------


class FusedDoraLinear(torch.autograd.Function):
    """DoRA on a frozen nn.Linear or quantized base as one autograd node.

    Forward, with ``f = m / ||W + s B A||`` (fp32, detached) and ``u = W x' + s B (A x')``::

        no dropout:  y = f * u + b                      (x' = x)
        dropout:     y = W (x - x') + b + f * u          (x' = dropout(x); PEFT's y0 + (f - 1) W x' + f s B A x')

    Backward: ``dm = sum_tokens(dy * u) / ||.||`` (``= sum_tokens(dy * y) / m`` without dropout and bias), and with
    ``g = f * dy`` the LoRA gradients of ``g``
    (``dB = s g^T (A x')``, ``dA = s (g B)^T x'``), ``dx = g W + s (g B) A`` (dropout: ``dx = dy W``,
    ``dx' = ((f - 1) dy) W + s (g B) A``).

    Why: PEFT builds ``B A`` through an identity matrix, then ``W + s B A`` and its norm every step, and keeps the
    base output and the LoRA output (two out-wide tensors) for backward, across some ten graph nodes. Here the norm
    comes from ``W A^T`` (:func:`linear_weight_norm`), the LoRA product is added inside the base GEMM (``addmm_``),
    and y is scaled in place. Besides what LoRA keeps, backward needs only ``u`` or, where ``y = f * u`` (no dropout,
    no bias, f away from 0), ``y`` itself, which the next op often keeps anyway (an MLP's activation): on the DoRA
    benchmark this took the bytes kept for backward from 389 to 317 MiB. A caller's in-place op on
    ``y`` is seen by its version counter, and ``u`` is then computed again. A quantized base is dequantized once per
    direction, for the norm and the product together.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_lora: torch.Tensor | None, lora_a: torch.Tensor,  # noqa: ANN001
                lora_b: torch.Tensor, magnitude: torch.Tensor, base: nn.Module, scaling: float,
                dtype: torch.dtype) -> torch.Tensor:
        weight, state = _frozen_weight_and_state(base, dtype)
        # (out,) fp32; from a float base's own weight, not its copy in the products' dtype (bf16 under autocast)
        norm = linear_weight_norm(base.weight if isinstance(base, nn.Linear) else weight, lora_a, lora_b, scaling)
        m_dtype = magnitude.dtype
        scale32 = magnitude.detach().to(norm.dtype) / norm
        scale = scale32.to(dtype)
        flat_x = x.reshape(-1, x.shape[-1]).to(dtype)
        lora_in = flat_x if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1]).to(dtype)
        lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        after_a_t = lora_a @ lora_in.t()  # (r, tokens): the fast layout for small r (see FusedLoraLinear)
        result, u = unflattened_empty(x, weight.shape[0], dtype)  # u: the flat view the products write into
        low_rank_then_base(after_a_t, lora_b, scaling, lora_in, weight, None, out=u)
        # no dropout, no bias, f far from 0 and a dtype wide enough that f * u keeps u's digits: y = f * u, so u need
        # not be kept: m's gradient is sum(dy * y) / (f ||W + s B A||), with f as applied (rounded to bf16 under
        # autocast)
        ctx.output = None
        # (not under saved-tensor hooks: activation checkpointing or save_on_cpu must see all that backward needs)
        # (nor under torch.compile: the check below is data-dependent, and the graph decides what it keeps itself)
        if (not torch.compiler.is_compiling() and x_lora is None and bias is None and dtype != torch.float16
                and not saved_tensor_hooks_active() and bool((scale32.abs() > 1e-15).all())):
            out = result.mul_(scale)
            # detached: shares y's storage and version counter without a reference back to this node (save_for_backward
            # would make a caller's in-place op on y, e.g. ReLU(inplace=True), fail the backward; here it is seen and
            # u is computed again)
            ctx.output, ctx.output_version = out.detach(), out._version
            u = None
        elif x_lora is None:
            out = result * scale if bias is None else torch.addcmul(bias, result, scale)
        else:
            out = F.linear((flat_x - lora_in).view(*x.shape[:-1], -1), weight, bias)
            out.addcmul_(result, scale)
        ctx.input_structure, kept = keep_input(x, lora_in, x_lora)
        ctx.save_for_backward(lora_a, lora_b, after_a_t, u, scale, norm, *kept)
        ctx.base, ctx.state, ctx.scaling, ctx.separate_lora_input = base, state, scaling, x_lora is not None
        ctx.input_dtypes = (x.dtype, None if x_lora is None else x_lora.dtype, m_dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        # DoRA's scale and norm are made outside autograd: under create_graph, first derivatives only
        return fused_gradients(FusedDoraLinear.gradients, ctx, grad, differentiable=False)

    @staticmethod
    def gradients(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        lora_a, lora_b, after_a_t, u, scale, norm, *kept = ctx.saved_tensors
        needs_x, needs_x_lora, needs_a, needs_b, needs_m = ctx.needs_input_grad[:5]
        x_dtype, x_lora_dtype, m_dtype = ctx.input_dtypes
        dtype, scaling = lora_a.dtype, ctx.scaling
        lora_in = None
        flat_grad = grad.reshape(-1, grad.shape[-1]).to(dtype)
        weight = None
        output, ctx.output = ctx.output, None  # released here, not when the graph's last node goes
        source = divisor = None
        if needs_m:  # m's gradient: sum over tokens of dy * u / ||W + s B A||, with u = y / f where y was kept
            if output is not None and output._version == ctx.output_version:
                source, divisor = output.view(flat_grad.shape), scale.to(norm.dtype) * norm
            else:
                if u is None:  # y was changed in place after forward (or this is a second backward): u again
                    weight = _frozen_weight(ctx.base, dtype, ctx.state)
                    lora_in = kept_input(ctx.input_structure, kept, lora_a)
                    u = low_rank_then_base(after_a_t, lora_b, scaling, lora_in, weight, None)
                source, divisor = u, norm
        product = grad_m = None
        if source is not None:  # in fp32 under bf16; the product's memory is then reused for grad_u
            product = flat_grad * source
            grad_m = product.sum(0, dtype=norm.dtype).div_(divisor).to(m_dtype)
        del u, output, source
        grad_u = torch.mul(flat_grad, scale, out=product)  # (tokens, out); a fresh tensor when product is None
        # (r, tokens), already scaled; B^T grad^T is MKL's fast layout (see FusedLoraLinear.backward)
        grad_after_a_t = (lora_b.t() @ grad_u.t()).mul_(scaling)
        grad_after_a = grad_after_a_t.t()
        if needs_a and lora_in is None:
            lora_in = kept_input(ctx.input_structure, kept, lora_a)
        grad_a = grad_after_a_t @ lora_in if needs_a else None
        if lora_in is None:
            skip_input(ctx.input_structure)
        grad_b = (after_a_t @ grad_u).mul_(scaling).t() if needs_b else None
        grad_x = grad_x_lora = None
        if weight is None and (needs_x or needs_x_lora):
            weight = _frozen_weight(ctx.base, dtype, ctx.state)
        if not ctx.separate_lora_input:
            if needs_x:  # the rank-r product first, the base GEMM adding into it (see low_rank_then_base)
                grad_x = (grad_after_a @ lora_a).addmm_(grad_u, weight)
        else:
            if needs_x:
                grad_x = flat_grad @ weight
            if needs_x_lora:
                grad_x_lora = (grad_after_a @ lora_a).addmm_(flat_grad * (scale - 1), weight)
                grad_x_lora = grad_x_lora.view(*grad.shape[:-1], -1).to(x_lora_dtype)
        if grad_x is not None:
            grad_x = grad_x.view(*grad.shape[:-1], -1).to(x_dtype)
        return grad_x, grad_x_lora, grad_a, grad_b, grad_m, None, None, None
