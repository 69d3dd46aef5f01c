"""Load a Llama-architecture GGUF file straight into 4 (or 8) bits, one tensor at a time.

The same scheme as :mod:`deltatune.quant.load`, with a GGUF file as the source: the config comes from the file's
metadata (through transformers, as its own ``from_pretrained(..., gguf_file=...)`` builds it), the model is created
on the meta device with quantized shells for its linear layers, then each GGUF tensor is read, dequantized to
float32 with gguf-py (a few rows at a time, into the final array), un-permuted where llama.cpp permuted it (the
q/k projections, for its rotary layout), mapped to its transformers name, and quantized or placed by
:func:`deltatune.quant.load.fill_quantized_shell`. The result is what quantizing the float model that
transformers loads from the same file gives, bit for bit, without that float model ever existing.

Tensor bytes are read with plain file reads (the reader's memory map serves only the metadata), for the reason
given in :mod:`deltatune.quant.load`: touched map pages would count as resident memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .convert import quantize_model
from .load import fill_quantized_shell

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 8 << 20  # float32 output per dequantization step: bounds gguf-py's temporaries to a few times this


class _TensorInfo(NamedTuple):
    name: str
    raw_shape: tuple[int, ...]
    raw_dtype: np.dtype
    data_offset: int
    n_bytes: int
    tensor_type: Any


def _dequantize_rows(f: Any, tensor: _TensorInfo) -> np.ndarray:
    """The float32 array of one GGUF tensor, read from the open file ``f`` and dequantized a slab of rows at a time.

    ``tensor`` holds a ``gguf.ReaderTensor``'s metadata: ``raw_shape`` and ``raw_dtype`` are those of its ``data``
    (rows of packed blocks for a quantized type). The shape is gguf-py's: (rows, columns) for a matrix, i.e.
    transformers' (out, in).
    """
    from gguf import dequantize

    raw_shape, raw_dtype = tensor.raw_shape, tensor.raw_dtype
    rows = raw_shape[0]
    row_bytes = tensor.n_bytes // rows
    out = None
    step = 1
    i = 0
    f.seek(tensor.data_offset)
    while i < rows:
        n = min(step, rows - i)
        buf = bytearray(n * row_bytes)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"GGUF file ends inside tensor {tensor.name!r}")
        part = dequantize(np.frombuffer(buf, dtype=raw_dtype).reshape(n, *raw_shape[1:]), tensor.tensor_type)
        if out is None:
            out = np.empty((rows, *part.shape[1:]), dtype=np.float32)
            step = max(1, _CHUNK_BYTES // max(1, part[:1].nbytes))
        out[i:i + n] = part
        i += n
        del buf, part
    return out


def iter_gguf(path: str | Path, model: nn.Module, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(transformers name, float32 tensor)`` for each tensor of a GGUF file that ``model`` has.

    Args:
        path: the .gguf file.
        model: the (meta-device, not yet quantized) transformers model, for the name mapping.
        config: the config as a dict (``num_attention_heads``, ``num_key_value_heads`` for the q/k un-permutation).

    The name mapping is done on the call, the reading lazily as the iterator is consumed. Tensors the model
    lacks are skipped with a warning; only architectures whose GGUF tensors map one to one onto
    transformers ones (Llama and the like) are handled.
    """
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        LlamaTensorProcessor,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    try:
        reader = GGUFReader(path)
        architecture = read_field(reader, "general.architecture")[0]
    except Exception as err:  # gguf-py fails on a cut header with numpy, struct or index errors
        raise unreadable_gguf(path, err) from err
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class not in (TensorProcessor, LlamaTensorProcessor):
        raise NotImplementedError(f"{path}: GGUF architecture {architecture!r} needs tensor processing "
                                  f"({processor_class.__name__}) that this loader does not do")
    processor = processor_class(config=config)
    names = get_gguf_hf_weights_map(model, processor)  # now, not at the first next(): the model may change after
    # keep only what the reads need: the reader's parsed metadata (the tokenizer's ~100k strings as numpy
    # objects) is tens of MiB that would otherwise stay alive for the whole load
    tensors = [_TensorInfo(t.name, tuple(int(d) for d in t.data.shape), t.data.dtype, int(t.data_offset),
                           int(t.n_bytes), t.tensor_type) for t in reader.tensors]
    del reader

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        unexpected = []
        with open(path, "rb") as f:
            for tensor in tensors:
                if tensor.name not in names:  # processing keeps Llama's names; skip before reading
                    unexpected.append(tensor.name)
                    continue
                weights = _dequantize_rows(f, tensor)
                # the same un-permutation (q/k) as transformers; exact, numpy only moves values
                result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names,
                                           parsed_parameters={})
                del weights
                yield names[result.name], torch.from_numpy(np.ascontiguousarray(result.weights))
                del result
        if unexpected:
            logger.warning("ignored %d GGUF tensors the model does not have: %s", len(unexpected), unexpected[:5])

    return stream()


def unreadable_gguf(path: str | Path, err: Exception) -> ValueError:
    """One clear error, naming the file, for a GGUF file whose header cannot be parsed (cut short or damaged)."""
    return ValueError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err}). A file cut short (an "
                      "interrupted download or copy) or damaged fails like this; get it again.")


def _read_config(path: Path) -> Any:
    """transformers' config from the GGUF metadata; a header it cannot parse is :func:`unreadable_gguf`, while its
    own clear refusals (an architecture it does not support) pass through as they are."""
    from transformers import AutoConfig  # heavy; only here

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, NotImplementedError) as err:
        if "architecture" in str(err):
            raise
        raise unreadable_gguf(path, err) from err
    except Exception as err:  # struct.error, IndexError, ... from a cut header
        raise unreadable_gguf(path, err) from err


def load_gguf_quantized(path: str | Path, bits: int = 4, compute_dtype: torch.dtype | None = None,
                        blocksize: int = 64, double_quant: bool = True, skip_modules: Iterable[str] | None = None,
                        dtype: torch.dtype | None = None, quant_type: str = "nf4") -> nn.Module:
    """Build a transformers causal LM from a GGUF file with its linear layers in NF4 (FP4, int8), streaming.

    Args:
        path: the .gguf file (Llama architecture, or one whose tensors need no more than Llama's q/k un-permutation).
        bits, compute_dtype, blocksize, double_quant, skip_modules, quant_type: as in :func:`quantize_model`.
        dtype: float dtype for the tensors that stay float (and the recorded dtype of quantized ones);
            None keeps float32, what GGUF tensors dequantize to.

    Returns:
        The model in eval mode, on CPU; a tied output head shares the input embedding.

    Raises:
        FileNotFoundError: no such file.
        NotImplementedError: an architecture whose GGUF tensors need processing this loader does not do.
        ValueError: a file that is cut short or damaged (one line naming it), a tensor whose shape disagrees with
            the model, a weight holding NaN or Inf (named), or model tensors the file lacks.
    """
    from transformers import AutoModelForCausalLM  # heavy; only here

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    config = _read_config(path)
    with torch.device("meta"):  # no float weight is ever allocated, nor randomly initialized
        model = AutoModelForCausalLM.from_config(config)
    gguf_tensors = iter_gguf(path, model, config.to_dict())  # maps names off the float model: before quantizing
    quantize_model(model, bits, compute_dtype, blocksize, double_quant, skip_modules, quant_type=quant_type)
    return fill_quantized_shell(model, gguf_tensors, set(), dtype, str(path))
