"""LoRA's fused training path: ``base(x) + scaling * B A dropout(x)`` as one autograd node.

Used by ``methods/lora.py``'s ``LoraLayer`` for a frozen nn.Linear or quantized base with one active
adapter during training; everything else takes the module-by-module path, which gives the same
gradients (tested against each other and with ``gradcheck``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .lora_inputs import RebuiltInput, rebuildable_input


def _frozen_weight_and_state(base: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a forward: the (out, in) weight of a frozen nn.Linear in ``dtype``, or a quantized layer's weight rebuilt,
    with what the backward's :func:`_frozen_weight` may reuse (a quantized layer's block scales)."""
    if isinstance(base, nn.Linear):
        return base.weight.to(dtype), None
    return base.transient_weight_and_state(dtype)


def _frozen_weight(base: nn.Module, dtype: torch.dtype, state: torch.Tensor | None) -> torch.Tensor:
    """For a backward: the same weight again (a quantized layer's copy is safe to keep under create_graph)."""
    if isinstance(base, nn.Linear):
        return base.weight.to(dtype)
    return base.transient_weight(dtype, state)


def runs_plain(*modules: nn.Module) -> bool:
    """No hook and no replaced ``forward`` on any of ``modules`` (nor global module hooks): calling around them
    changes nothing.

    accelerate's offloading, for one, swaps a module's ``forward`` to bring its weights in; the fused path must
    then not read the weights behind its back.
    """
    if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
        return False
    for module in modules:
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
            return False
    return True


def low_rank_then_base(after_a_t: torch.Tensor, lora_b: torch.Tensor, scaling: float, x: torch.Tensor,
                       weight: torch.Tensor, bias: torch.Tensor | None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + bias + scaling * (A x)^T B^T`` for a flat ``x`` (tokens, in), given ``after_a_t`` = A x^T (r, tokens);
    written into ``out`` (tokens, out) when given.

    The rank-r product is written first and the base GEMM adds into it (``addmm_`` with beta 1): MKL folds reading
    the output into a GEMM that is bound by arithmetic, where adding a rank-r product to a finished output is a
    separate pass over memory. On the SmolLM2 shapes (fp32, 2 threads, 1024 tokens) this took LoRA's cost on a
    576 -> 1536 layer from +578 to +84 us over the bare GEMM, and from +243 to ~0 on 1536 -> 576. ``scaling`` rides
    on addmm's alpha (beta 0 ignores the zero input), which spares a kernel call that costs as much as the product
    when decoding a few rows.
    """
    start = bias if bias is not None else after_a_t.new_zeros(())
    low_rank = torch.addmm(start, after_a_t.t(), lora_b.t(), beta=1 if bias is not None else 0, alpha=scaling,
                           out=out)
    return low_rank.addmm_(x, weight.t())


def unflattened_empty(x: torch.Tensor, features: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialised output shaped like ``x`` with ``features`` last, and its flat (tokens, features) view.

    A fused node returns the first, so that its output is not a view made inside a custom autograd Function: autograd
    forbids in-place ops on those, and a model may run one right after the layer (``nn.ReLU(inplace=True)``).
    """
    result = x.new_empty(*x.shape[:-1], features, dtype=dtype)
    return result, result.view(-1, features)


def keep_input(x: torch.Tensor, lora_in: torch.Tensor,
               x_lora: torch.Tensor | None) -> tuple[RebuiltInput | None, list[torch.Tensor]]:
    """What a fused node keeps for A's gradient: the factors ``x`` can be rebuilt from (see ``lora_inputs``) with
    how to rebuild it, or ``(None, [input])``: the layer's input (``x_lora`` with dropout) as given, or its copy in
    the products' dtype where that differs (autocast). A node that keeps the
    factors must call :func:`kept_input` or :func:`skip_input` once in its backward (the layers sharing the input
    count on it; an ``x`` with factors to rebuild from needs a gradient, so that backward runs)."""
    found = rebuildable_input(x) if x_lora is None else None
    if found is not None:
        return found
    given = x if x_lora is None else x_lora
    # the input itself where no cast was made: the same values, and a backward under create_graph stays connected
    # to the graph that made it
    return None, [given if given.dtype == lora_in.dtype else lora_in]


def kept_input(source: RebuiltInput | None, kept: list[torch.Tensor], lora_a: torch.Tensor) -> torch.Tensor:
    """The flat (tokens, in) input in ``lora_a``'s dtype, from what :func:`keep_input` kept."""
    if source is None:
        return kept[0].reshape(-1, lora_a.shape[1]).to(lora_a.dtype)
    return source.take(kept, lora_a.shape[1], lora_a.dtype)


def skip_input(source: RebuiltInput | None) -> None:
    """For a backward that did not read the input: the layers sharing it need not hold it for this one."""
    if source is not None:
        source.skip()


SECOND_DERIVATIVE_MESSAGE = (
    "A backward went through gradients that deltatune's fused training path computed under create_graph=True (a "
    "second derivative), which it cannot give for DoRA layers or under autocast. Call "
    "deltatune.set_fused_training(model, False) before the forward: the module-by-module path gives them.")


class _FirstDerivativeOnly(torch.autograd.Function):
    """Stands in for a fused node's gradients under ``create_graph=True`` where they cannot be differentiated
    (DoRA's scale and norm, autocast's cast copies are made outside autograd): differentiating them raises, where
    they would otherwise be taken as constants and give a wrong second derivative, silently."""

    @staticmethod
    def forward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        raise RuntimeError(SECOND_DERIVATIVE_MESSAGE)


def fused_gradients(gradients: Callable, ctx: object, grad: torch.Tensor,
                    differentiable: bool) -> tuple[torch.Tensor | None, ...]:
    """A fused node's backward: ``gradients(ctx, grad)``; under ``create_graph=True`` for a node whose gradients
    cannot be differentiated, computed without a graph and returned behind a node that raises if they are
    differentiated (what ``torch.autograd.function.once_differentiable`` does, with a message that says what to
    do)."""
    if not torch.is_grad_enabled() or differentiable:
        return gradients(ctx, grad)
    with torch.no_grad():
        grads = gradients(ctx, grad)
    places = [i for i, g in enumerate(grads) if g is not None]
    stand_ins = _FirstDerivativeOnly.apply(*(grads[i].detach().requires_grad_() for i in places))
    out = list(grads)
    for i, g in zip(places, stand_ins, strict=True):
        out[i] = g
    return tuple(out)


class FusedLoraLinear(torch.autograd.Function):
    """``base(x) + scaling * B A dropout(x)`` as one autograd node, for a frozen nn.Linear or quantized base.

    Why: as separate modules, a training step pays per layer for four graph nodes, a copy of the base output to add
    the update to, and a second gradient for x (base and LoRA parts) that autograd then adds together. Here the
    update is added inside the GEMM (``addmm_``) in both directions, and a quantized base rebuilds its weight in
    backward from block scales kept from forward. On the step benchmarks (SmolLM2-135M shape, all linear layers,
    CPU) this took QLoRA from 1.003 to 0.968 of PEFT + bitsandbytes' time and LoRA from 0.991 to 0.95 of PEFT's.

    ``x_lora`` is ``dropout(x)`` when dropout is on, else None (then x feeds both paths and gets one summed
    gradient); dropout stays outside so autograd takes its mask into account. ``dtype`` is what every product runs
    in: the input's, or autocast's (bf16), which then casts the input, weights and adapter the way autocast would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_lora: torch.Tensor | None, lora_a: torch.Tensor,  # noqa: ANN001
                lora_b: torch.Tensor, base: nn.Module, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        weight, state = _frozen_weight_and_state(base, dtype)
        # no cast copies (autocast makes them): a backward under create_graph is then differentiable (see backward)
        ctx.differentiable = all(t is None or t.dtype == dtype for t in (x, x_lora, lora_a, lora_b))
        flat_x = x.reshape(-1, x.shape[-1]).to(dtype)
        lora_in = flat_x if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1]).to(dtype)
        lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        # A x^T as (r, tokens): with r this small, MKL is 1.5-3x faster in this layout than x A^T (and for B's
        # gradient below), measured on the SmolLM2 shapes
        after_a_t = lora_a @ lora_in.t()
        result, flat_result = unflattened_empty(x, weight.shape[0], dtype)
        low_rank_then_base(after_a_t, lora_b, scaling, flat_x, weight, bias, out=flat_result)
        ctx.input_structure, kept = keep_input(x, lora_in, x_lora)
        ctx.save_for_backward(lora_a, lora_b, after_a_t, *kept)
        ctx.base, ctx.state, ctx.scaling, ctx.separate_lora_input = base, state, scaling, x_lora is not None
        ctx.input_dtypes = (x.dtype, None if x_lora is None else x_lora.dtype)
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        return fused_gradients(FusedLoraLinear.gradients, ctx, grad, ctx.differentiable)

    @staticmethod
    def gradients(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        """The node's gradients; under ``create_graph=True`` (grad mode on here) from tensors connected to the graph,
        so that a gradient penalty differentiates them correctly: forward's ``A x`` (made outside autograd) is made
        again from A and the input."""
        lora_a, lora_b, after_a_t, *kept = ctx.saved_tensors  # all in the products' dtype but the kept input
        needs_x, needs_x_lora, needs_a, needs_b = ctx.needs_input_grad[:4]
        x_dtype, x_lora_dtype = ctx.input_dtypes
        second_order = torch.is_grad_enabled()
        flat_grad = grad.reshape(-1, grad.shape[-1]).to(lora_a.dtype)
        # (r, tokens), already scaled: B^T grad^T runs 2.5-3x faster than grad B on the SmolLM2 shapes (MKL, CPU)
        grad_after_a_t = (lora_b.t() @ flat_grad.t()).mul_(ctx.scaling)
        lora_in = None
        if needs_a or (second_order and needs_b):
            lora_in = kept_input(ctx.input_structure, kept, lora_a)
        else:
            skip_input(ctx.input_structure)
        if second_order and lora_in is not None:
            after_a_t = lora_a @ lora_in.t()
        grad_a = grad_after_a_t @ lora_in if needs_a else None
        grad_b = (after_a_t @ flat_grad).mul_(ctx.scaling).t() if needs_b else None
        grad_x = grad_x_lora = None
        if needs_x:
            weight = _frozen_weight(ctx.base, lora_a.dtype, ctx.state)
            if ctx.separate_lora_input:
                grad_x = flat_grad @ weight
            else:  # the rank-r product first, the base GEMM adding into it (see low_rank_then_base)
                grad_x = (grad_after_a_t.t() @ lora_a).addmm_(flat_grad, weight)
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1]).to(x_dtype)
        if ctx.separate_lora_input and needs_x_lora:
            grad_x_lora = (grad_after_a_t.t() @ lora_a).view(*grad.shape[:-1], lora_a.shape[-1]).to(x_lora_dtype)
        return grad_x, grad_x_lora, grad_a, grad_b, None, None, None
