"""4-bit weights: NF4, the NormalFloat format of QLoRA (Dettmers et al. 2023, section 3), and FP4, in pure PyTorch.

Layout, chosen to be bit-for-bit the one bitsandbytes writes so weights move between the two freely:

* the weight is flattened (row-major) and cut into blocks of ``blocksize`` (64) values; the last block may be short;
* each block is scaled by its absmax into [-1, 1] and every value is replaced by the index of the nearest of the
  16 code values (a value exactly half-way goes to the lower code);
* two 4-bit indices per byte, the first value in the high nibble: ``[a, b, c, d] -> [ab, cd]``; an odd count is
  padded with the index of 0.0;
* double quantization (section 3, "Double Quantization"): the fp32 absmax values minus their mean ``offset`` are
  themselves quantized to 8 bits with bitsandbytes' dynamic map, in blocks of 256, each with an fp32 absmax.

Bytes per parameter: 0.5 (codes) + 1/64 (8-bit absmax) + 4/(64*256) (nested absmax) = 4.127 bits.
The code tables are module constants, never stored per weight.

NF4 spends its 16 values on the quantiles of a normal distribution, which is what pretrained weights look like;
FP4 (1 sign, 2 exponent, 1 mantissa bit, bitsandbytes' variant) spaces them like a float. The QLoRA paper measured NF4
better (its table 2); FP4 is here for checkpoints made with ``quant_type="fp4"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
from torch import nn

from ..func_transforms import outside_func_transforms

# QLoRA's NF4 values (bitsandbytes' `get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes' FP4 (`get_4bit_type("fp4")`), in the order of the codes 0..15: bit 3 is the sign, then exponent and
# mantissa, so code 8 is -0. The table is these values divided by 12 in fp32, so that the largest is 1.
FP4_TWELFTHS = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
# Elements quantized at a time: bounds the temporaries (int32 indices, scaled copy) to about 1 MiB per weight,
# which is what lets the streaming loader stay close to the size of the final model.
_CHUNK = 1 << 16
# Packed bytes decoded at a time on CPU (1.5 MiB of fp32 values): see `_chunk_blocks`.
_DECODE_CHUNK_BYTES = 3 << 16
# The CPU 8-bit quantizer of bitsandbytes maps x in [-1, 1] to a 65536-entry grid and looks the code up there.
_LUT_STEPS = 65535


@cache
def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as fp32, on ``device`` (cached)."""
    return _code_values("nf4", device)


@cache
def fp4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 FP4 values as fp32 in code order (not sorted: code 8 is -0), on ``device`` (cached)."""
    return _code_values("fp4", device)


def _code_values(quant_type: str, device: torch.device | str) -> torch.Tensor:
    """The table built from the Python constants, uncached (what a torch.compile trace can run)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    return torch.tensor(FP4_TWELFTHS, dtype=torch.float32, device=device) / 12.0


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 values that the 4-bit codes of ``quant_type`` ("nf4" or "fp4") stand for."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return nf4_code(device) if quant_type == "nf4" else fp4_code(device)


@cache
def _bounds_and_codes(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decision bounds for `bucketize` and, when the table is not sorted, the code of each bucket.

    The bounds are the midpoints between neighbouring values, so a value goes to its nearest code and a tie to the
    lower one. NF4 is sorted, so a bucket is its code. FP4 is sorted first; of its two zeros +0 sorts first, so
    small negative values get code 0 (+0) and small positive ones code 8 (-0), which is what bitsandbytes' CPU
    quantizer writes too (both dequantize to zero).
    """
    if quant_type == "nf4":
        code = nf4_code(device)
        return (code[:-1] + code[1:]) / 2, None
    code = fp4_code(device)
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order.to(torch.uint8)


@cache
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256,) int64: byte -> the fp32 bit patterns of (high nibble's value, low nibble's value), side by side.

    Looking up 8-byte integers decodes two codes at once, and an integer copy keeps every bit; see `DecodePlan`.
    """
    code = code_table(quant_type, device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()  # (256, 2) fp32
    return pairs.view(torch.int64).reshape(256)


def _chunk_blocks(nblocks: int, blocksize: int, device: torch.device) -> list[tuple[int, int]]:
    """Ranges of whole blocks to decode at a time: on CPU about `_DECODE_CHUNK_BYTES` packed bytes each, else one.

    Scaling a chunk right after gathering it finds the values still in the cores' caches; a whole 1536x576 weight
    (3.5 MiB of fp32 plus 3.5 MiB of int64 indices) does not fit. In an A/B of the whole QLoRA step on 2 threads
    (SmolLM2-135M shape), 1.5 MiB chunks beat whole weights by about 0.5-1% and beat 0.75 and 3 MiB chunks.
    """
    if device.type != "cpu" or blocksize % 2:
        return [(0, nblocks)]
    per_chunk = max(1, _DECODE_CHUNK_BYTES // (blocksize // 2))
    chunks = max(1, round(nblocks / per_chunk))
    step = -(-nblocks // chunks)
    return [(first, min(first + step, nblocks)) for first in range(0, nblocks, step)]


# dynamic_map()'s 256 values as Python floats (exact: fp32 -> float -> fp32), filled by the first double-quantized
# Weight4bit, so that a torch.compile trace reads a constant instead of calling the cached builder
_DYNAMIC_MAP_FLOATS: list[float] = []


@cache
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted fp32 values in [-1, 1].

    Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning": a sign, a run-length exponent and a
    linear fraction. Built with the same fp32 operations as bitsandbytes so the values agree to the bit.
    """
    data: list[float] = [0.0, 1.0]
    exp_bits, non_sign_bits = 7, 7
    for i in range(exp_bits):
        items = int(2 ** (i + non_sign_bits - exp_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(exp_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


@cache
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """(65536,) uint8: grid point k/65535*2-1 -> index of the nearest dynamic-map value (the CPU quantizer's table)."""
    code = dynamic_map(device)
    grid = (torch.arange(_LUT_STEPS + 1, dtype=torch.float32, device=device) / _LUT_STEPS) * 2 - 1
    return torch.bucketize(grid, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic blockwise quantization of a 1-D fp32 tensor, as bitsandbytes' CPU kernel does it.

    Returns ``(codes uint8 (n,), absmax fp32 (ceil(n / blocksize),))``. Each value is scaled by the reciprocal of its
    block's absmax, mapped to the grid ``round(((v + 1) / 2) * 65535)`` and looked up in a 65536-entry table of
    nearest codes; this reproduces bitsandbytes' codes exactly (a true nearest search differs on a few values
    per million, which would break bit-exact interchange).
    """
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = nn.functional.pad(x.reshape(-1).float(), (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # zero padding never raises a block's absmax
    normed = (padded * (1.0 / absmax).unsqueeze(1)).reshape(-1)[:n]
    normed = normed.nan_to_num(-1.0).clamp(-1, 1)  # an all-zero block gives 0/0; bitsandbytes stores code 0 there
    grid = (((normed + 1.0) * 0.5) * _LUT_STEPS + 0.5).to(torch.int32)
    return _dynamic_lut(x.device)[grid], absmax


def _quantize_4bit_codes(flat: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float tensor -> (packed uint8 (ceil(n/2),), fp32 absmax (ceil(n/blocksize),)), chunk by chunk."""
    n = flat.numel()
    bounds, codes = _bounds_and_codes(quant_type, flat.device)
    full = n - n % blocksize
    chunk = max(blocksize, _CHUNK - _CHUNK % blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, full, chunk):
        part = flat[start:min(start + chunk, full)].float().view(-1, blocksize)
        amax = part.abs().amax(dim=1)
        absmax[start // blocksize:start // blocksize + amax.numel()] = amax
        scaled = (part * (1.0 / amax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).view(-1)
        packed[start // 2:(start + scaled.numel()) // 2] = _pack(torch.bucketize(scaled, bounds, out_int32=True), codes)
    if full < n:  # the short last block: bitsandbytes divides here (and clamps the stored absmax), so we do too
        tail = flat[full:].float()
        amax = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = amax
        scaled = (tail / amax).clamp(-1, 1)
        if scaled.numel() % 2:
            scaled = nn.functional.pad(scaled, (0, 1))
        packed[full // 2:] = _pack(torch.bucketize(scaled, bounds, out_int32=True), codes)
    return packed, absmax


def _pack(buckets: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
    q = buckets.to(torch.uint8) if codes is None else codes[buckets]
    return (q[0::2] << 4) | q[1::2]  # [a, b, c, d] -> [ab, cd]


def _allocate(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device=device)


def _device_only(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """`nn.Module._apply` that moves buffers between devices but never changes their dtype.

    `model.half()` or `model.to(torch.bfloat16)` must not round the fp32 scales of a quantized weight; the
    target device is read off ``fn`` applied to an empty tensor.
    """
    for name, buf in module._buffers.items():
        if buf is not None:
            device = fn(torch.empty(0, device=buf.device)).device
            module._buffers[name] = buf.to(device)
    return module


class Weight4bit(nn.Module):
    """A weight of any shape stored as 4-bit codes (NF4 or FP4); an `nn.Module` so `.to(device)` and `state_dict` work.

    Buffers: ``packed`` uint8 (ceil(n/2),); ``absmax`` uint8 (nblocks,) with double quantization, else fp32;
    with double quantization also ``nested_absmax`` fp32 (ceil(nblocks/256),) and ``offset`` fp32 (). ``shape`` and
    ``dtype`` are those of the original weight; ``dequantize()`` returns that dtype unless told otherwise.
    ``quant_type`` says which 16 values the codes stand for.
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...],
                 dtype: torch.dtype, blocksize: int = 64, nested_absmax: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, quant_type: str = "nf4") -> None:
        super().__init__()
        code_table(quant_type)  # refuses an unknown type
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        packed = packed.reshape(-1).view(torch.uint8)  # bitsandbytes may store the bytes as another dtype
        if packed.numel() != (n + 1) // 2 or absmax.numel() != nblocks:
            raise ValueError(f"4-bit weight of shape {tuple(shape)} and blocksize {blocksize} needs {(n + 1) // 2} "
                             f"packed bytes and {nblocks} absmax values, got {packed.numel()} and {absmax.numel()}")
        if (nested_absmax is None) != (offset is None) or (nested_absmax is not None) != (absmax.dtype == torch.uint8):
            raise ValueError("double quantization needs uint8 absmax, nested_absmax and offset together")
        if nested_absmax is not None and not _DYNAMIC_MAP_FLOATS:  # for _traceable_dequantize
            _DYNAMIC_MAP_FLOATS.extend(dynamic_map("cpu").tolist())
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax.reshape(-1))
        self.register_buffer("nested_absmax", nested_absmax)
        self.register_buffer("offset", offset.reshape(()) if offset is not None else None)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True,
              device: torch.device | str = "meta", quant_type: str = "nf4") -> Weight4bit:
        """An uninitialized weight of the right sizes (a shell on the meta device for streaming loads)."""
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
        if not double_quant:
            return cls(packed, torch.empty(nblocks, device=device), shape, dtype, blocksize, quant_type=quant_type)
        return cls(packed, torch.empty(nblocks, dtype=torch.uint8, device=device), shape, dtype, blocksize,
                   torch.empty(-(-nblocks // NESTED_BLOCKSIZE), device=device), torch.empty((), device=device),
                   quant_type)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Every byte this weight stores: codes, absmax, nested absmax and offset (the code tables are shared)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scales in fp32, undoing double quantization: ``dyn[q] * nested_absmax[i // 256] + offset``.

        The roundings (one multiply, then one add) are bitsandbytes'. Without double quantization the stored absmax
        is returned. A fresh tensor; layers compute the same into their :class:`DecodePlan`'s buffer instead.
        """
        if not self.double_quant:
            return self.absmax
        nblocks = self.absmax.numel()
        out = torch.empty(nblocks, dtype=torch.float32, device=self.absmax.device)
        return _compute_scales(_scale_steps(self, out, torch.empty(nblocks, dtype=torch.int32, device=out.device)))

    def dequantize(self, dtype: torch.dtype | None = None,
                   scratch: Callable[[int, torch.dtype, torch.device], torch.Tensor] | None = None,
                   scales: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight, ``table[code] * absmax[block]`` computed in fp32 and rounded once to ``dtype``.

        Bit-exact with ``bitsandbytes.functional.dequantize_4bit`` for the same codes. The forward and backward of
        every quantized layer run this, so it touches memory as little as pure PyTorch allows: per chunk of blocks,
        one gather of two values per byte (:class:`DecodePlan`) straight into the result, then one scale per block
        while the chunk is still in cache (:func:`_chunk_blocks`). A caller that decodes the same weight into the
        same buffers again and again keeps a :class:`DecodePlan` instead.

        Args:
            dtype: result dtype; None gives the original weight's.
            scratch: ``scratch(numel, dtype, device)`` returns a 1-D tensor to write into instead of allocating; the
                result is then a view of such a tensor, valid until the caller reuses it. On CPU this saves the
                page faults of fresh buffers (see ``linear.py``); None allocates.
            scales: this weight's :meth:`absmax_fp32`, when the caller already has it (a layer's backward reuses
                the forward's); None computes it.
        """
        if torch.compiler.is_compiling():
            return self._traceable_dequantize(dtype or self.dtype)
        # under torch.func the codes and scales are constants: decoded as plain tensors (a plan reads their data
        # pointers, which torch.func's wrappers do not have)
        with outside_func_transforms():
            return DecodePlan(self, dtype or self.dtype, scratch or _allocate).run(scales)

    def _traceable_dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The same decode in plain ops, for ``torch.compile`` to trace: no plan, no ``out=``, no data pointers (a
        compiled graph may fuse the scale's multiply and add, so the last bit can differ from bitsandbytes')."""
        nblocks, blocksize, device = self.absmax.numel(), self.blocksize, self.packed.device
        table = _code_values(self.quant_type, device)  # not the cached code_table: that would break the graph
        codes = torch.stack([self.packed >> 4, self.packed & 15], dim=1).reshape(-1).long()  # high nibble first
        values = nn.functional.pad(table[codes], (0, nblocks * blocksize - 2 * self.packed.numel()))  # short block
        scales = self.absmax
        if self.double_quant:
            dynamic = torch.tensor(_DYNAMIC_MAP_FLOATS, dtype=torch.float32, device=device)
            nested = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:nblocks]
            scales = dynamic[self.absmax.long()] * nested + self.offset
        flat = (values.view(nblocks, blocksize) * scales.unsqueeze(1)).reshape(-1)[:self.shape.numel()]
        return flat.view(self.shape).to(dtype)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        return _device_only(self, fn)

    def extra_repr(self) -> str:
        return f"{self.quant_type}, shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, " \
               f"double_quant={self.double_quant}, nbytes={self.nbytes}"


class DecodePlan:
    """One 4-bit weight's decode into fixed buffers, with every tensor view made up front.

    Why: making the views (per chunk: codes, indices, values, scales, result) costs more Python time than the
    arithmetic of most layers; on a 1536x576 weight, 2 threads, about 90 of 320 us. A quantized layer decodes the same
    weight into the same scratch buffers every step, so it keeps a plan and :meth:`run` costs three ops per chunk.
    A plan stays valid while its buffers are not handed to someone else and the weight's tensors are the same objects
    (:meth:`fits`); results are views of the buffers.
    """

    def __init__(self, weight: Weight4bit, dtype: torch.dtype,
                 take: Callable[[int, torch.dtype, torch.device], torch.Tensor]) -> None:
        packed = weight.packed
        device = packed.device
        nblocks, nbytes, blocksize = weight.absmax.numel(), packed.numel(), weight.blocksize
        size = nblocks * blocksize
        self.dtype = dtype
        self.on_cpu = device.type == "cpu"
        self.threaded = _threaded_gather(self.on_cpu)
        self.sources = [weight._buffers[name] for name in _BUFFER_NAMES]  # what `fits` compares, by identity
        floats = take(size + nblocks, torch.float32, device)  # the values, then the scales
        self.scales = floats[size:]
        self.scale_steps = _scale_steps(weight, self.scales, take(nblocks, torch.int32, device))
        values = floats[:size]
        blocks = values.view(nblocks, blocksize)
        out = blocks if dtype == torch.float32 else take(size, dtype, device).view(blocks.shape)
        n = weight.shape.numel()
        self.result = out.view(weight.shape) if size == n else out.view(-1)[:n].view(weight.shape)
        self.tail = values[2 * nbytes:] if size > 2 * nbytes else None  # a short last block, zeroed per run
        pairs = values[:2 * nbytes].view(torch.int64)  # two values per packed byte, high nibble first
        table = _pair_table(weight.quant_type, device)
        index = take(nbytes, torch.int64 if self.threaded else torch.int32, device)
        scale = self.scales.unsqueeze(1)
        self.steps = []
        for first, last in _chunk_blocks(nblocks, blocksize, device):
            lo, hi = first * blocksize // 2, min(last * blocksize // 2, nbytes)
            codes, chunk_index, chunk_pairs = packed[lo:hi], index[:hi - lo], pairs[lo:hi]
            rows = math.gcd(hi - lo, 256)
            if self.threaded and rows > 1:
                gather = (table.expand(rows, 256), chunk_index.view(rows, -1), chunk_pairs.view(rows, -1))
            else:
                gather = (table, chunk_index, chunk_pairs)
            self.steps.append((codes, chunk_index, gather, blocks[first:last], scale[first:last], out[first:last]))

    def fits(self, weight: Weight4bit, dtype: torch.dtype) -> bool:
        """Whether this plan still decodes ``weight`` into ``dtype`` the way this thread count wants.

        Called before every replay, so written for speed: the buffers straight from ``_buffers``, no generators.
        """
        if dtype != self.dtype or _threaded_gather(self.on_cpu) != self.threaded:
            return False
        buffers, sources = weight._buffers, self.sources
        return buffers["packed"] is sources[0] and buffers["absmax"] is sources[1] and \
            buffers["nested_absmax"] is sources[2] and buffers["offset"] is sources[3]

    def block_scales(self) -> torch.Tensor:
        """Compute the fp32 block scales into the plan's buffer (a view; :meth:`run` then needs no ``scales``)."""
        if self.scale_steps is None:
            return self.sources[1]  # no double quantization: the stored absmax
        return _compute_scales(self.scale_steps)

    def run(self, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Decode; ``scales`` are the weight's block scales if the caller has them (kept from an earlier
        :meth:`block_scales`, or its own view from just now), None to compute them."""
        if scales is None:
            scales = self.block_scales()
        if scales.data_ptr() != self.scales.data_ptr():
            self.scales.copy_(scales)
        if self.tail is not None:
            self.tail.zero_()  # so the short block's scale stays finite
        for codes, index, (table, gather_index, pairs), blocks, scale, out in self.steps:
            index.copy_(codes)
            if table.dim() == 2:  # the row-split view of the threaded path
                torch.gather(table, 1, gather_index, out=pairs)
            else:
                torch.index_select(table, 0, index, out=pairs)
            torch.mul(blocks, scale, out=out)
        return self.result


_BUFFER_NAMES = ("packed", "absmax", "nested_absmax", "offset")


def _threaded_gather(on_cpu: bool) -> bool:
    """Whether `DecodePlan` looks the pairs up with `gather` rather than `index_select`.

    On one CPU thread `index_select` with int32 indices is the fastest (about 3x ``table[idx]``), but it never uses
    a second thread. With more threads, `gather` along the rows of a (rows, 256) stride-0 view of the table splits
    the rows over the threads; on 2 cores it took a 1536x576 weight's lookup from about 210 to 136 us (its int64
    indices cost a wider copy, which is why one thread keeps `index_select`).
    """
    return on_cpu and torch.get_num_threads() > 1


def _scale_steps(weight: Weight4bit, out: torch.Tensor, index: torch.Tensor) -> tuple | None:
    """The views :func:`_compute_scales` needs to undo double quantization into ``out`` (fp32) with ``index``
    (int32), each of ``nblocks`` elements; None without double quantization."""
    if not weight.double_quant:
        return None
    nblocks = out.numel()
    whole = nblocks - nblocks % NESTED_BLOCKSIZE
    nested = weight.nested_absmax
    return (out, index, dynamic_map(out.device),
            out[:whole].view(-1, NESTED_BLOCKSIZE) if whole else None,
            nested[:whole // NESTED_BLOCKSIZE].unsqueeze(1) if whole else None,
            out[whole:] if whole < nblocks else None, nested[-1], weight.offset, weight.absmax)


def _compute_scales(steps: tuple) -> torch.Tensor:
    """Run :func:`_scale_steps`' views: ``dyn[q]``, times the nested absmax of each group of 256 blocks (a short
    last group included), plus the offset; returns their ``out``."""
    out, index, dynamic, whole, nested_whole, tail, nested_last, offset, codes = steps
    torch.index_select(dynamic, 0, index.copy_(codes), out=out)
    if whole is not None:
        whole.mul_(nested_whole)
    if tail is not None:
        tail.mul_(nested_last)
    return out.add_(offset)


def refuse_non_finite(stats: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    """Raise when a weight holds NaN or Inf, seen in its per-block (or per-row) absmax ``stats``.

    An absmax is NaN or Inf exactly when its block holds one, so checking the few absmax values costs nothing;
    the weight itself is searched only to name the place in the error. bitsandbytes quantizes such a weight
    without a word (NaN spreads through double quantization to the whole tensor); a model that computes NaN
    is never what was wanted.

    Raises:
        ValueError: saying how many values are not finite and where the first one is.
    """
    if bool(torch.isfinite(stats).all()):
        return
    bad = ~torch.isfinite(weight.detach())
    first = tuple(int(i) for i in bad.nonzero()[0]) if bad.any() else ()
    raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)} to {what}: {int(bad.sum())} of its "
                     f"values are NaN or Inf (the first at index {first}). The checkpoint is damaged or the "
                     "training that made it diverged; quantizing would make the layer output NaN.")


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> Weight4bit:
    """Quantize a float tensor of any shape to NF4 (QLoRA, section 3).

    Args:
        weight: fp32, fp16 or bf16 tensor; any shape, any size (a short last block is allowed).
        blocksize: values per absmax; bitsandbytes accepts 32..4096 (powers of two), QLoRA uses 64.
        double_quant: also quantize the absmax values to 8 bits in blocks of 256 (bitsandbytes'
            ``compress_statistics=True``): 4.127 instead of 4.5 bits per parameter.

    Returns:
        A :class:`Weight4bit` on ``weight.device`` with the same codes and scales that
        ``bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics, quant_type="nf4")`` gives.

    Raises:
        ValueError: for a non-float or empty tensor, a meta tensor, a blocksize that is not a power of two >= 2,
            or a weight holding NaN or Inf.
    """
    return quantize_4bit(weight, blocksize, double_quant, "nf4")


def quantize_fp4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> Weight4bit:
    """Quantize to bitsandbytes' FP4 (``quant_type="fp4"``); otherwise as :func:`quantize_nf4`."""
    return quantize_4bit(weight, blocksize, double_quant, "fp4")


def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                  quant_type: str = "nf4") -> Weight4bit:
    """:func:`quantize_nf4` or :func:`quantize_fp4`, picked by ``quant_type``."""
    code_table(quant_type)  # refuses an unknown type before any work
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization takes fp32, fp16 or bf16 weights, got {weight.dtype}")
    if weight.numel() == 0 or weight.is_meta:
        raise ValueError(f"cannot quantize an empty or meta tensor (shape {tuple(weight.shape)}, {weight.device})")
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize}")
    with torch.no_grad():
        packed, absmax = _quantize_4bit_codes(weight.detach().reshape(-1), blocksize, quant_type)
        refuse_non_finite(absmax, weight, quant_type.upper())
        if not double_quant:
            return Weight4bit(packed, absmax, weight.shape, weight.dtype, blocksize, quant_type=quant_type)
        offset = absmax.mean()
        qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return Weight4bit(packed, qabsmax, weight.shape, weight.dtype, blocksize, nested_absmax, offset, quant_type)
