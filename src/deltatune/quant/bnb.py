"""Interchange with bitsandbytes: the same NF4 (or FP4) bytes, moved in either direction without requantizing.

`to_bnb` / `from_bnb` convert layers (bitsandbytes is imported only inside them). `weight_from_bnb_state_dict`
reads the tensors bitsandbytes and transformers write for a 4-bit layer (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4`` or ``__fp4``) with torch and json alone, so such checkpoints load
without bitsandbytes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..func_transforms import func_transform_active, outside_func_transforms
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


# ---- merging into a bitsandbytes layer (what PEFT's lora/bnb.py does) ----------------------------------------------


def bnb_weight_kind(layer: torch.nn.Module) -> str | None:
    """"4bit" / "8bit" for a ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` (by its weight's class, so
    bitsandbytes is never imported for it), else None.

    Such layers subclass ``nn.Linear`` but store codes, so writing ``weight.data += delta`` would round the update
    into int8 zeros (8-bit) or fail on the packed shape (4-bit): they need a dequantize / requantize round trip.
    """
    weight = getattr(layer, "weight", None)
    if not type(weight).__module__.startswith("bitsandbytes"):
        return None
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(type(weight).__name__)


def _unpack_cpu_layout(layer: torch.nn.Module) -> None:
    """Put a 4-bit weight that bitsandbytes repacked for its AVX512-BF16 CPU kernel back into its standard layout.

    bitsandbytes' ``Linear4bit.forward`` repacks the codes in place (and un-nests the absmax) the first time it runs
    in inference on such a CPU; ``dequantize_4bit`` only reads the standard layout. bitsandbytes undoes it the same
    way before saving a state dict; the next inference forward repacks.
    """
    weight = layer.weight
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if hasattr(layer, "quant_state"):
        layer.quant_state = weight.quant_state


def bnb_dequantized_weight(layer: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float (out, in) weight a bitsandbytes 4-bit or 8-bit layer computes with.

    4-bit: ``dequantize_4bit`` into ``dtype`` (default: the quant state's, the weight's dtype before quantizing).
    8-bit: int8 codes times each row's absmax / 127 (the scale lives on the weight until the first forward, then in
    the layer's ``state``), in float32.

    Raises:
        ValueError: ``layer`` is not a quantized bitsandbytes layer.
    """
    import bitsandbytes.functional as bnb_functional

    kind = bnb_weight_kind(layer)
    weight = layer.weight
    # bitsandbytes' ops have no torch.func rules; the codes are constants, so decode them outside the transform
    with outside_func_transforms():
        if kind == "4bit":
            if not weight.bnb_quantized:
                return weight.data
            _unpack_cpu_layout(layer)
            state = weight.quant_state
            if dtype is not None and dtype != state.dtype:  # decoded straight into dtype, as its matmul does
                state = copy.copy(state)
                state.dtype = dtype
            return bnb_functional.dequantize_4bit(weight.data, state)
        if kind == "8bit":
            if weight.data.is_floating_point():  # has_fp16_weights: the layer keeps a float weight
                return weight.data
            state = layer.state
            scale = state.SCB if state.SCB is not None else weight.SCB
            if scale is None:
                raise ValueError(f"{type(layer).__name__} holds int8 codes but no row scales (SCB); cannot dequantize.")
            return bnb_functional.int8_vectorwise_dequant(weight.data, scale.to(weight.device))
    raise ValueError(f"{type(layer).__name__} is not a quantized bitsandbytes Linear4bit / Linear8bitLt layer.")


def _bnb_layer_class(layer: torch.nn.Module) -> str | None:
    """"4bit" / "8bit" for a bitsandbytes ``Linear4bit`` (or a subclass) / ``Linear8bitLt`` by the layer's class,
    whatever its weight currently is (``functional_call`` may have put a plain tensor there)."""
    if not type(layer).__module__.startswith("bitsandbytes"):
        return None
    names = {cls.__name__ for cls in type(layer).__mro__}
    return "4bit" if "Linear4bit" in names else "8bit" if "Linear8bitLt" in names else None


def call_base_layer(layer: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``layer(x, ...)``, except for a bitsandbytes layer inside a ``torch.func`` transform or forward-mode AD.

    Why: bitsandbytes' matmuls are autograd Functions and custom ops without ``torch.func`` rules, so per-sample
    gradients (``vmap(grad(...))``), ``jvp`` or dual tensors through a bitsandbytes-loaded model fail inside
    bitsandbytes (PEFT's too). A 4-bit layer's training forward is ``x W^T + b`` with ``W`` decoded straight into
    the compute dtype, which plain ops give with the same values: the codes are decoded outside the transform (they
    are constants) and the product runs inside it. An 8-bit layer's matmul differs by device and mode (on GPU it
    also quantizes the input), so it is refused with an error that says what to use instead.

    Raises:
        ValueError: inside a transform, a bitsandbytes 8-bit layer, or a 4-bit layer whose weight was replaced by
            a plain tensor (``functional_call`` given every parameter, the frozen codes too).
    """
    kind = _bnb_layer_class(layer) if func_transform_active() and not (args or kwargs) else None
    if kind is None:
        return layer(x, *args, **kwargs)
    name = type(layer).__name__
    if kind == "8bit":
        raise ValueError(
            f"A bitsandbytes 8-bit layer ({name}) cannot run inside a torch.func transform or forward-mode AD: its "
            "int8 matmul has no torch.func rules, and no plain form gives its values on every device (on GPU it "
            "also quantizes the input); PEFT fails here too. Load the model in 4-bit "
            "(BitsAndBytesConfig(load_in_4bit=True)), quantize the float model with deltatune.quant.quantize_model "
            "instead, or take gradients without torch.func.")
    if bnb_weight_kind(layer) != "4bit":
        raise ValueError(
            f"The weight of the bitsandbytes layer {name} is a plain tensor here, without its quantization state: "
            "inside torch.func, pass functional_call only the trainable parameters (e.g. {n: p for n, p in "
            "model.named_parameters() if p.requires_grad}); the frozen 4-bit codes stay in the model.")
    dtype = getattr(layer, "compute_dtype", None) or x.dtype
    weight = bnb_dequantized_weight(layer, dtype).to(dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), weight, bias).to(x.dtype)


def bnb_requantize(layer: torch.nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` (float, out x in) in a bitsandbytes layer, quantized as bitsandbytes quantizes on load.

    A fresh ``Params4bit`` (same blocksize, quant type, double quantization, storage dtype; the dtype the layer
    dequantized to before) or ``Int8Params`` (row-wise int8 of the fp16 weight) replaces the old one, as PEFT's merge
    does; the rounding of that quantization is the price of merging into a quantized layer.
    """
    import bitsandbytes as bnb

    kind = bnb_weight_kind(layer)
    old = layer.weight
    device = old.device
    if kind == "4bit":
        state = old.quant_state
        dtype = weight.dtype if state is None else getattr(state, "original_dtype", state.dtype) \
            if getattr(state, "packing_format_for_cpu", False) else state.dtype
        new = bnb.nn.Params4bit(weight.to("cpu", dtype), requires_grad=False, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                quant_storage=old.quant_storage, module=layer)
        layer.weight = new.to(device)  # moving to a device is what quantizes a Params4bit
        return
    if kind == "8bit":
        if old.data.is_floating_point():
            old.data.copy_(weight.to(old.dtype))
            return
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                         has_fp16_weights=old.has_fp16_weights).to(device)
        layer.state.reset_grads()  # drop the old codes and scales the layer's state kept from its last forward
        return
    raise ValueError(f"{type(layer).__name__} is not a quantized bitsandbytes Linear4bit / Linear8bitLt layer.")


def bnb_add_to_weight(layer: torch.nn.Module, delta: torch.Tensor, safe: bool = False, where: str = "") -> None:
    """W <- quantize(dequantize(W) + delta) on a bitsandbytes layer (PEFT's merge / unmerge of LoRA into it).

    Args:
        delta: shaped like the weight (out, in); negative to unmerge.
        safe: check the sum is finite before anything is written.

    Raises:
        ValueError: the sum has NaN/Inf (with ``safe``); the layer is left as it was.
    """
    merged = bnb_dequantized_weight(layer).to(delta.device, torch.promote_types(delta.dtype, torch.float32)) + delta
    if safe and not torch.isfinite(merged).all():
        raise ValueError(f"{where or type(layer).__name__}: merging gives NaN/Inf; nothing was merged.")
    bnb_requantize(layer, merged)
