"""LoRA's inference short path: the base weight and A as one matrix, so an unmerged adapter costs one small GEMM.

Unmerged inference pays per adapted layer for the product with A (a second pass over the input and, when decoding
one token per row, a second kernel launch that costs as much as its arithmetic) and for adding B's product to the
output. Stacking ``[W; A]`` into one (out + r, in) matrix makes the base GEMM produce ``A x`` in r extra columns at
no measurable cost; ``addmm`` then adds ``scaling * B (A x)`` while it writes the output.

The stacked matrix is not a copy: the base weight and A become views into it (their ``Parameter`` objects stay the
same, only their ``.data`` moves), so no weight is held twice and an optimizer step or a merge that writes either in
place writes the stacked matrix too. Anything that gives them new storage (``model.to(...)``, loading with
``assign=True``) breaks the stacking, which each call checks by address; it is then stacked again. At most one
adapter per layer is stacked; switching adapters moves the previous one's A back into its own storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Stacked:
    """``[W; A]`` of one layer's base weight and one adapter's A, with the bias padded by r zeros."""

    def __init__(self, name: str, weight: nn.Parameter, down: nn.Parameter, bias: nn.Parameter | None) -> None:
        self.name = name
        with torch.inference_mode(False), torch.no_grad():  # never inference tensors: the model may train next
            self.matrix = torch.cat([weight.data, down.data])
            weight.data = self.matrix[: weight.shape[0]]
            down.data = self.matrix[weight.shape[0]:]
            self.bias = None
            if bias is not None:
                self.bias = torch.cat([bias.data, bias.data.new_zeros(down.shape[0])])
                bias.data = self.bias[: weight.shape[0]]

    def holds(self, name: str, weight: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether this layer's current tensors are still the views made here (nothing moved or resized them)."""
        matrix = self.matrix
        return (name == self.name and weight.data_ptr() == matrix.data_ptr()
                and down.data_ptr() == matrix.data_ptr() + weight.numel() * matrix.element_size()
                and weight.dtype == down.dtype == matrix.dtype and weight.shape[0] + down.shape[0] == matrix.shape[0]
                and (bias is None if self.bias is None else bias.data_ptr() == self.bias.data_ptr()))

    @staticmethod
    def release(*tensors: nn.Parameter | None) -> None:
        """Give each tensor its own storage again (A before another adapter is stacked; W, A and the bias when the
        layer is unloaded), so the stacked matrix is freed with the last of them and nothing saves it whole."""
        with torch.inference_mode(False), torch.no_grad():
            for tensor in tensors:
                if tensor is not None:
                    tensor.data = tensor.data.clone()


def forward(stacked: Stacked, x: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W x + bias + scaling * B A x`` from the stacked matrix: one GEMM for ``[W; A] x``, one ``addmm`` for B."""
    both = F.linear(x, stacked.matrix, stacked.bias)
    out_features = up.shape[0]
    flat = both.view(-1, both.shape[-1])
    out = torch.addmm(flat[:, :out_features], flat[:, out_features:], up.t(), alpha=scaling)
    return out.view(*x.shape[:-1], out_features)
