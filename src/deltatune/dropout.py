"""Dropout that draws only the dropped positions: the same Bernoulli(p) masks as ``nn.Dropout``, at a fraction of the
random numbers when p is small.

Why: LoRA's dropout (``lora_dropout``, 0.05 in most recipes) runs on the input of every adapted layer, and
``nn.Dropout`` draws one random number per element. On a CPU that is most of what a small model's training step
does besides the matmuls: in the main job (SmolLM2-135M, all linear layers, 4 x 82 tokens under bf16 autocast) the
210 masks took 23% of a micro-batch. The positions a Bernoulli(p) process drops are separated by independent
Geometric(p) gaps, so drawing the gaps (about ``p * n`` numbers for ``n`` elements) and summing them gives exactly
the same distribution of masks as drawing all ``n``. Backward keeps those positions instead of a mask of ``n``
bytes. The random stream differs from ``nn.Dropout``'s, so a seed gives other masks than PEFT's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .func_transforms import func_transform_active

SPARSE_UP_TO = 0.5  # above this, drawing every element is cheaper than drawing the gaps


def dropped_positions(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """Flat indices of the elements a Bernoulli(p) process over ``numel`` elements drops, ascending."""
    expected = numel * p
    draws = int(expected + 6.0 * math.sqrt(expected * (1.0 - p)) + 16)
    positions = _geometric(draws, p, device).cumsum_(0).sub_(1)
    while int(positions[-1]) < numel:  # the draws fell short of the end (rarer than 1 in 10^8): go on from there
        positions = torch.cat([positions, _geometric(draws, p, device).cumsum_(0).add_(positions[-1])])
    return positions[: int(torch.searchsorted(positions, numel))].to(torch.int64)


def _geometric(count: int, p: float, device: torch.device) -> torch.Tensor:
    """``count`` Geometric(p) draws (trials up to and including the first success), as float64 integers.

    ``floor(log(1 - u) / log(1 - p)) + 1`` for uniform u in [0, 1): P(gap > k) = (1 - p)^k exactly, up to float64's
    resolution of u (2^-53). 1.7x faster than ``Tensor.geometric_``, which draws and converts one element at a time.
    """
    u = torch.rand(count, dtype=torch.float64, device=device)
    return torch.log1p(u.neg_()).div_(math.log1p(-p)).floor_().add_(1)


class _SparseDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # noqa: ANN001
        positions = dropped_positions(x.numel(), p, x.device)
        scale = 1.0 / (1.0 - p)
        out = (x * scale).contiguous()
        out.view(-1)[positions] = 0
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (positions,) = ctx.saved_tensors
        grad_x = (grad * ctx.scale).contiguous()
        grad_x.view(-1)[positions] = 0
        return grad_x, None


def sparse_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with masks drawn as gaps (see the module docstring) when ``0 < p <= 0.5``."""
    if not training or p == 0.0:
        return x
    # (torch.func and torch.compile cannot go through the Function and its data-dependent draw: F.dropout there)
    if not 0.0 < p <= SPARSE_UP_TO or x.numel() == 0 or func_transform_active() or torch.compiler.is_compiling():
        return nn.functional.dropout(x, p, training)
    return _SparseDropout.apply(x, p)


def mask_bytes_per_element(dropout: nn.Dropout) -> float:
    """What a training forward of ``dropout`` keeps for backward besides its output, in bytes per input element:
    nn.Dropout's mask (one byte each), or the dropped positions (8 bytes, a fraction p of the elements)."""
    if isinstance(dropout, SparseDropout) and not dropout.inplace and 0.0 < dropout.p <= SPARSE_UP_TO:
        return 8.0 * dropout.p
    return 1.0


class SparseDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same behaviour in eval mode, an instance of it) whose training masks come from
    :func:`sparse_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return sparse_dropout(x, self.p, self.training)
