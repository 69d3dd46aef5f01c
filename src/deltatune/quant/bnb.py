"""Interchange with bitsandbytes: the same NF4 (or FP4) bytes, moved in either direction without requantizing.

`to_bnb` / `from_bnb` convert layers (bitsandbytes is imported only inside them). `weight_from_bnb_state_dict`
reads the tensors bitsandbytes and transformers write for a 4-bit layer (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4`` or ``__fp4``) with torch and json alone, so such checkpoints load
without bitsandbytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from .linear import Linear4bit
from .nf4 import NESTED_BLOCKSIZE, QUANT_TYPES, Weight4bit, code_table, dynamic_map


def _require(present: dict[str, Any], where: str) -> None:
    missing = [name for name, value in present.items() if value is None]
    if missing:
        raise ValueError(f"{where}: incomplete bitsandbytes quant state, missing {', '.join(missing)}")


def _check_tables(code: torch.Tensor, nested_code: torch.Tensor | None, quant_type: str, where: str) -> None:
    if not torch.equal(code.detach().float().cpu(), code_table(quant_type)):
        raise ValueError(f"{where}: quant_map is not the {quant_type.upper()} code (custom maps are not supported)")
    if nested_code is not None and not torch.equal(nested_code.detach().float().cpu(), dynamic_map()):
        raise ValueError(f"{where}: nested_quant_map is not bitsandbytes' dynamic map")


def weight_from_quant_state(packed: torch.Tensor, quant_state: Any, where: str = "quant_state") -> Weight4bit:
    """Wrap bitsandbytes' packed codes and ``QuantState`` as an :class:`Weight4bit` (tensors are shared, not copied).

    Raises:
        ValueError: naming what is missing (absmax, shape, dtype, blocksize, code, nested absmax / code /
            offset for a nested state), or for a quant type other than nf4 / fp4 or a nested blocksize other than 256.
    """
    _require({"quant_state": quant_state}, where)
    get = lambda name: getattr(quant_state, name, None)  # noqa: E731
    _require({n: get(n) for n in ("absmax", "shape", "dtype", "blocksize", "code", "quant_type")}, where)
    quant_type = quant_state.quant_type
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{where}: quant_type {quant_type!r} is not supported, only {' or '.join(QUANT_TYPES)}")
    state2 = get("state2")
    nested = state2 is not None or get("offset") is not None or quant_state.absmax.dtype == torch.uint8
    if not nested:
        _check_tables(quant_state.code, None, quant_type, where)
        return Weight4bit(packed, quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize,
                          quant_type=quant_type)
    _require({"state2": state2, "offset": get("offset")}, where)
    _require({"state2.absmax": getattr(state2, "absmax", None), "state2.code": getattr(state2, "code", None),
              "state2.blocksize": getattr(state2, "blocksize", None)}, where)
    if state2.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"{where}: nested blocksize {state2.blocksize} is not supported, only {NESTED_BLOCKSIZE}")
    _check_tables(quant_state.code, state2.code, quant_type, where)
    offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device)
    return Weight4bit(packed, quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize,
                      state2.absmax, offset, quant_type)


def weight_from_bnb_state_dict(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> Weight4bit:
    """Read one bitsandbytes 4-bit weight from its serialized tensors (``{prefix}weight`` and companions).

    Raises:
        ValueError: naming each missing tensor or JSON field, e.g. ``weight.nested_absmax`` when the JSON says
            the state is nested but the tensor is absent.
    """
    key = lambda name: f"{prefix}weight{name}"  # noqa: E731
    blob = next((v for k, v in tensors.items() if k.startswith(key(".quant_state.bitsandbytes__"))), None)
    _require({key(""): tensors.get(key("")), key(".absmax"): tensors.get(key(".absmax")),
              key(".quant_map"): tensors.get(key(".quant_map")),
              key(".quant_state.bitsandbytes__nf4 (or __fp4)"): blob}, prefix or "state dict")
    meta = json.loads(bytes(blob.cpu().to(torch.uint8).tolist()).decode("utf-8"))
    fields = {f"{key('.quant_state')}[{f!r}]": meta.get(f) for f in ("quant_type", "blocksize", "dtype", "shape")}
    _require(fields, prefix or "state dict")
    nested = "nested_absmax" in meta or "nested_offset" in meta or key(".nested_absmax") in tensors
    state2 = offset = None
    if nested:
        _require({key(".nested_absmax"): tensors.get(key(".nested_absmax")),
                  key(".nested_quant_map"): tensors.get(key(".nested_quant_map")),
                  f"{key('.quant_state')}['nested_offset']": meta.get("nested_offset"),
                  f"{key('.quant_state')}['nested_blocksize']": meta.get("nested_blocksize")}, prefix or "state dict")
        state2 = _State(absmax=tensors[key(".nested_absmax")], code=tensors[key(".nested_quant_map")],
                        blocksize=meta["nested_blocksize"])
        offset = torch.tensor(float(meta["nested_offset"]))
    state = _State(absmax=tensors[key(".absmax")], code=tensors[key(".quant_map")], blocksize=meta["blocksize"],
                   shape=torch.Size(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                   quant_type=meta["quant_type"], state2=state2, offset=offset)
    return weight_from_quant_state(tensors[key("")], state, prefix or "state dict")


class _State:
    """A stand-in for bitsandbytes' QuantState when reading a checkpoint without bitsandbytes."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def to_bnb(layer: Linear4bit) -> torch.nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding the same packed codes and scales as ``layer`` (shared, not copied).

    Raises:
        ImportError: bitsandbytes is not installed.
        ValueError: ``layer`` is not a :class:`Linear4bit` with a 2-D weight.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    if not isinstance(layer, Linear4bit):
        raise ValueError(f"to_bnb converts deltatune Linear4bit layers, got {type(layer).__name__}")
    w = layer.weight
    device = w.device
    state2 = None
    if w.double_quant:
        state2 = QuantState(absmax=w.nested_absmax, code=dynamic_map(device).clone(), blocksize=NESTED_BLOCKSIZE,
                            dtype=torch.float32)
    state = QuantState(absmax=w.absmax, shape=w.shape, code=code_table(w.quant_type, device).clone(),
                       blocksize=w.blocksize, quant_type=w.quant_type, dtype=w.dtype, offset=w.offset, state2=state2)
    out = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            compute_dtype=layer.compute_dtype, compress_statistics=w.double_quant,
                            quant_type=w.quant_type, device="meta")
    out.weight = bnb.nn.Params4bit(w.packed.view(-1, 1), requires_grad=False, quant_state=state,
                                   blocksize=w.blocksize, compress_statistics=w.double_quant, quant_type=w.quant_type,
                                   module=out, bnb_quantized=True)
    out.bias = layer.bias
    return out


def from_bnb(layer: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> Linear4bit:
    """A deltatune :class:`Linear4bit` sharing the codes of a quantized ``bitsandbytes.nn.Linear4bit``.

    Raises:
        ValueError: the layer is not quantized yet (no quant state), or its state is incomplete or neither NF4 nor FP4.
    """
    weight = getattr(layer, "weight", None)
    where = f"{type(layer).__name__}.weight"
    state = getattr(weight, "quant_state", None)
    _require({"weight": weight, "weight.quant_state (quantize the layer first, e.g. .to(device))": state}, where)
    ours = weight_from_quant_state(weight.data, state, where)
    dtype = compute_dtype if compute_dtype is not None else getattr(layer, "compute_dtype", None)
    return Linear4bit(ours, layer.bias, dtype)
