"""deltatune <-> bitsandbytes: the same bytes either way, and clear errors for incomplete quant states."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.quant import Linear4bit, from_bnb, to_bnb, weight_from_bnb_state_dict, weight_from_quant_state

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_through_bitsandbytes(double_quant, dtype, quant_type):
    ours = Linear4bit.from_linear(nn.Linear(128, 192).to(dtype), double_quant=double_quant, quant_type=quant_type)
    theirs = to_bnb(ours)
    assert isinstance(theirs, bnb.nn.Linear4bit) and theirs.weight.quant_state.quant_type == quant_type
    assert torch.equal(F.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state), ours.dequantized_weight())
    back = from_bnb(theirs)
    assert torch.equal(back.dequantized_weight(), ours.dequantized_weight()) and back.bias is ours.bias
    assert back.weight.quant_type == quant_type
    x = torch.randn(3, 128, dtype=dtype)
    with torch.no_grad():
        assert torch.allclose(theirs(x).float(), ours(x).float(), atol=1e-2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_layer_quantized_by_bitsandbytes_loads_exactly(quant_type):
    linear = nn.Linear(256, 64)
    theirs = bnb.nn.Linear4bit(256, 64, quant_type=quant_type, compress_statistics=True)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # quantizes
    ours = from_bnb(theirs)
    assert torch.equal(ours.dequantized_weight(), F.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state))
    assert torch.equal(ours.weight.packed, Linear4bit.from_linear(linear, quant_type=quant_type).weight.packed)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_serialized_state_dict_reads_without_bitsandbytes_objects(quant_type):
    ours = Linear4bit.from_linear(nn.Linear(128, 64), quant_type=quant_type)
    state = to_bnb(ours).state_dict()
    assert f"weight.quant_state.bitsandbytes__{quant_type}" in state
    read = weight_from_bnb_state_dict(state)
    assert read.quant_type == quant_type and torch.equal(read.dequantize(), ours.dequantized_weight())
    prefixed = {f"model.q_proj.{k}": v for k, v in state.items()}
    assert torch.equal(weight_from_bnb_state_dict(prefixed, "model.q_proj.").dequantize(), ours.dequantized_weight())


@pytest.mark.parametrize("drop", ["weight.absmax", "weight.nested_absmax", "weight.nested_quant_map",
                                  "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"])
def test_incomplete_state_dict_names_what_is_missing(drop):
    state = to_bnb(Linear4bit.from_linear(nn.Linear(128, 64))).state_dict()
    del state[drop]
    with pytest.raises(ValueError, match=rf"missing .*{drop.split('.', 1)[1].replace('.', '.')}"):
        weight_from_bnb_state_dict(state)


def test_incomplete_quant_state_names_what_is_missing():
    theirs = to_bnb(Linear4bit.from_linear(nn.Linear(128, 64)))
    state = theirs.weight.quant_state
    state.state2 = None
    with pytest.raises(ValueError, match="missing state2"):
        weight_from_quant_state(theirs.weight.data, state)
    state.absmax = None
    with pytest.raises(ValueError, match="missing absmax"):
        weight_from_quant_state(theirs.weight.data, state)
    with pytest.raises(ValueError, match="quant_state"):
        from_bnb(bnb.nn.Linear4bit(64, 64, quant_type="nf4"))
