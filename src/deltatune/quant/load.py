"""Load a Hugging Face safetensors model straight into 4 (or 8) bits, one tensor at a time.

The float model is never built: it is created on the meta device, linear layers become empty quantized
shells, then each tensor is read from disk, quantized or placed, and dropped before the next; buffers that are
computed rather than stored (rotary frequencies) are computed last. Peak memory is the final
model plus one float tensor plus a few MiB of quantization scratch (see `nf4._CHUNK`).

Tensors are read with plain file reads rather than a memory map: a mapped checkpoint counts in the process's
resident memory as pages are touched, and reading what we need is both simpler to account for and no slower.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from ..finite import all_finite
from ..targets import is_gpt2_conv1d
from .convert import quantize_model
from .int8 import quantize_int8
from .linear import Linear4bit, Linear8bit
from .nf4 import quantize_4bit

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint files of an HF folder: ``model.safetensors`` or the shards its index names."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    return files


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from one safetensors file, reading each tensor's bytes only when it is reached.

    The format: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``,
    then the raw little-endian data. Nothing is unpickled.
    """
    with open(path, "rb") as f:
        header = _read_header(f, path)
        base = f.tell()  # 8 + the header's length
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            buf = bytearray(end - start)
            f.seek(base + start)
            if f.readinto(buf) != end - start:
                raise ValueError(f"{path}: file ends inside tensor {name!r}")
            raw = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            yield name, raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
            del buf, raw  # before the next read: never two float tensors in memory at once


def _read_header(f: BinaryIO, path: str | Path) -> dict:
    """The JSON header of a safetensors file, or one error naming the file when it is cut short or damaged."""
    size = os.fstat(f.fileno()).st_size
    try:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(f"the header claims {header_len} bytes, the file has {size}")
        header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not a readable safetensors file ({err}); it may be cut short or damaged.") from err
    header.pop("__metadata__", None)
    return header


def _materialize_computed_buffers(model: nn.Module) -> None:
    """Give real values to buffers that are computed at construction (rotary ``inv_freq``), not loaded.

    The model was built on the meta device, so such buffers exist only as shapes; transformers' own
    ``_init_weights`` knows how to recompute them, which is what its ``from_pretrained`` does too.
    """
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            module.to_empty(device="cpu", recurse=False)
            if init is not None:
                init(module)


def _place(model: nn.Module, key: str, tensor: torch.Tensor, transposed: set[str], dtype: torch.dtype | None) -> bool:
    """Put one checkpoint tensor where it belongs; False when the model has no such tensor.

    A quantized layer's empty shell already carries its format (blocksize, double quantization, quant type).
    """
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    if tensor.is_floating_point() and dtype is not None:
        tensor = tensor.to(dtype)
    if isinstance(module, Linear4bit | Linear8bit) and attr == "weight":
        if module_name in transposed:
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(module.weight.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)}, model expects "
                             f"{tuple(module.weight.shape)}")
        try:
            if isinstance(module, Linear4bit):
                shell = module.weight
                module.weight = quantize_4bit(tensor, shell.blocksize, shell.double_quant, shell.quant_type)
            else:
                module.weight = quantize_int8(tensor)
        except ValueError as err:  # e.g. NaN/Inf in the weight: say which tensor
            raise ValueError(f"{key}: {err}") from err
        return True
    slot = module._parameters if attr in module._parameters else module._buffers if attr in module._buffers else None
    if slot is None:
        return False
    old = slot[attr]
    if old is not None and tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(old.shape)}")
    if isinstance(old, nn.Parameter):
        if not all_finite(tensor):  # once per tensor, at load time, without a tensor-sized temporary
            raise ValueError(f"{key}: {int((~torch.isfinite(tensor)).sum())} values are NaN or Inf; the checkpoint "
                             "is damaged (or the training that made it diverged), so the model would output NaN.")
        slot[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
    else:
        slot[attr] = tensor
    return True


def load_quantized(path: str | Path, bits: int = 4, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                   double_quant: bool = True, skip_modules: Iterable[str] | None = None,
                   dtype: torch.dtype | None = None, model_class: type | None = None,
                   quant_type: str = "nf4") -> nn.Module:
    """Build a transformers model from an HF folder with its linear layers in NF4 (FP4, int8), streaming.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` (or an index and shards).
        bits, compute_dtype, blocksize, double_quant, skip_modules, quant_type: as in :func:`quantize_model`.
        dtype: float dtype for the tensors that stay float (and the recorded dtype of quantized ones);
            None keeps each tensor's dtype on disk.
        model_class: a transformers class with ``from_config``; default ``AutoModelForCausalLM``.

    Returns:
        The model in eval mode, on CPU.

    Raises:
        FileNotFoundError: no config or no safetensors file.
        ValueError: a tensor whose shape disagrees with the model, a weight holding NaN or Inf (named), or model
            tensors the checkpoint lacks.
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy; only here

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    files = safetensors_files(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # no float weight is ever allocated, nor randomly initialized
        model = (model_class or AutoModelForCausalLM).from_config(config)
    transposed = {n for n, m in model.named_modules() if is_gpt2_conv1d(m)}
    quantize_model(model, bits, compute_dtype, blocksize, double_quant, skip_modules, quant_type=quant_type)
    tensors = (item for file in files for item in iter_safetensors(file))
    return fill_quantized_shell(model, tensors, transposed, dtype, str(folder))


def fill_quantized_shell(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], transposed: set[str],
                         dtype: torch.dtype | None, source: str) -> nn.Module:
    """Stream ``(name, tensor)`` pairs into a meta-device model whose linear layers are quantized shells.

    Shared by the safetensors and GGUF loaders: each tensor is placed (quantized on the way when its layer is) and
    dropped before the next is read; then tied weights are tied, computed buffers computed, and a tensor the source
    never provided is an error naming ``source``.
    """
    unexpected = []
    for key, tensor in tensors:
        if not _place(model, key, tensor, transposed, dtype):
            unexpected.append(key)
        del tensor
    if unexpected:
        logger.warning("ignored %d tensors of %s the model does not have: %s", len(unexpected), source,
                       unexpected[:5])
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    _materialize_computed_buffers(model)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{source}: the checkpoint lacks {len(missing)} model tensors, e.g. {missing[:5]}")
    return model.eval()
