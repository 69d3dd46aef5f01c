"""Int8 weights: LLM.int8()-style row-wise absmax quantization (Dettmers et al. 2022, section 3.1).

Each output row keeps its absmax ``s`` in fp32 and its values as ``round(w * 127 / s)`` in int8; the same
formulas as bitsandbytes' ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant`` (without the outlier split,
which only matters for int8 activations; our matmul runs in the compute dtype).
"""

from __future__ import annotations

import torch
from torch import nn

from .nf4 import _device_only, refuse_non_finite

_INV_127 = 7.874015718698502e-3  # bitsandbytes multiplies by this instead of dividing by 127


class Int8Weight(nn.Module):
    """A 2-D weight as int8 ``codes`` (out, in) and fp32 row absmax ``scale`` (out,); an `nn.Module` for `.to()`."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        if codes.dim() != 2 or codes.dtype != torch.int8 or scale.shape != (codes.shape[0],):
            raise ValueError(f"Int8Weight needs int8 codes (out, in) and scale (out,), got {codes.dtype} "
                             f"{tuple(codes.shape)} and {tuple(scale.shape)}")
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.float())
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: one per weight plus four per row."""
        return self.codes.numel() + 4 * self.scale.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``codes * scale / 127`` (bitsandbytes' order of operations), rounded once to ``dtype``."""
        return (self.codes * self.scale.view(-1, 1) * _INV_127).to(dtype or self.dtype)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        return _device_only(self, fn)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}, nbytes={self.nbytes}"


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Row-wise absmax int8: ``codes = round(w * 127 / max|w_row|)``.

    Args:
        weight: a 2-D fp32, fp16 or bf16 tensor (out, in).

    Returns:
        An :class:`Int8Weight` whose codes and scales equal bitsandbytes' ``int8_vectorwise_quant(weight)``
        (an all-zero row gets codes 0 where bitsandbytes would divide by zero).

    Raises:
        ValueError: for a tensor that is not 2-D float, is empty or on the meta device, or holds NaN or Inf.
    """
    if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"int8 quantizes 2-D fp32/fp16/bf16 weights, got {weight.dtype} {tuple(weight.shape)}")
    if weight.numel() == 0 or weight.is_meta:
        raise ValueError(f"cannot quantize an empty or meta tensor (shape {tuple(weight.shape)}, {weight.device})")
    with torch.no_grad():
        w = weight.detach()
        scale = w.abs().amax(dim=1).float()
        refuse_non_finite(scale, w, "int8")
        codes = torch.round(w * (127.0 / scale).unsqueeze(1)).nan_to_num_(0.0).to(torch.int8)
    return Int8Weight(codes, scale, weight.dtype)
