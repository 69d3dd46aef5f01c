"""Second derivatives (``create_graph=True``, then a backward through the gradients: a gradient penalty): the fused
LoRA node gives them as PEFT does; where it cannot (DoRA, autocast's cast copies) differentiating its gradients is an
error naming ``set_fused_training(model, False)``, whose module-by-module path gives them."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lora import LoraLayer
from tests.conftest import make_model, model_inputs, perturb


def _llama() -> torch.nn.Module:
    """The tiny Llama with eager attention: PyTorch's CPU flash attention has no second derivative."""
    model = make_model("llama")
    model.config._attn_implementation = "eager"
    return model


def _model(use_dora: bool = False) -> torch.nn.Module:
    model = dt.get_peft_model(_llama(), dt.LoraConfig(target_modules="all-linear", r=4, use_dora=use_dora))
    perturb(model)
    return model.train()


def _penalty_gradients(model: torch.nn.Module) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """First-order gradients taken with create_graph=True, then the gradients of their squared sum."""
    inputs = model_inputs("llama")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    first = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    sum(g.square().sum() for g in first).backward()
    return [g.detach() for g in first], {n: p.grad for n, p in params.items()}


def _peft_twin(ours: torch.nn.Module) -> torch.nn.Module:
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(target_modules="all-linear", r=4))
    missing, unexpected = theirs.load_state_dict({n: p for n, p in ours.state_dict().items() if "lora_" in n},
                                                 strict=False)
    assert not unexpected and not any("lora_" in n for n in missing)
    return theirs.train()


@pytest.mark.parametrize("fused", [True, False])
def test_a_gradient_penalty_differentiates_as_in_peft(fused):
    ours = _model()
    dt.set_fused_training(ours, fused)
    inputs = model_inputs("llama")
    q_proj = ours.base_model.model.model.layers[1].self_attn.q_proj
    seen = {}
    q_proj.register_forward_hook(lambda module, args, output: seen.update(node=type(output.grad_fn).__name__))
    ours(**inputs)
    assert (seen["node"] == "FusedLoraLinearBackward") == fused
    our_first, our_second = _penalty_gradients(ours)
    their_first, their_second = _penalty_gradients(_peft_twin(ours))
    for got, want in zip(our_first, their_first, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert our_second.keys() == their_second.keys()
    for name, grad in our_second.items():
        assert torch.allclose(grad, their_second[name], rtol=1e-4, atol=1e-6), name


def test_dora_s_second_derivative_is_an_error_its_first_ones_are_right():
    model = _model(use_dora=True)
    inputs = model_inputs("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    first = torch.autograd.grad(loss, params, create_graph=True)
    for got, want in zip(first, expected, strict=True):  # the model's other nodes round differently under create_graph
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="set_fused_training"):
        sum(g.square().sum() for g in first).backward()


def test_under_autocast_a_second_derivative_through_the_fused_node_is_an_error():
    """Autocast's bf16 copies of A, B and the input are made outside autograd: a penalty on A's gradient cannot be
    differentiated through them, and says so; the unfused path differentiates it."""
    layer = LoraLayer(nn.Linear(16, 8).requires_grad_(False))
    layer.add_adapter("a", r=2, lora_alpha=2, init_lora_weights=False)
    layer.active_adapters = ["a"]
    layer.train()
    x = torch.randn(4, 16, requires_grad=True)
    for fused in (True, False):
        layer.fused_training = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert (type(out.grad_fn).__name__ == "FusedLoraLinearBackward") == fused
        (grad_a,) = torch.autograd.grad(out.float().square().sum(), [layer.lora_A["a"].weight], create_graph=True)
        if fused:
            with pytest.raises(RuntimeError, match="set_fused_training"):
                grad_a.square().sum().backward()
        else:
            grad_a.square().sum().backward()
            assert layer.lora_B["a"].weight.grad is not None
