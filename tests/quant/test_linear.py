"""Linear4bit / Linear8bit and quantize_model: shapes, values, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.quant import Linear4bit, Linear8bit, Weight4bit, quantize_arguments, quantize_model
from tests.conftest import logits, make_model, model_inputs


@pytest.mark.parametrize("cls", [Linear4bit, Linear8bit])
def test_forward_is_matmul_with_the_dequantized_weight(cls):
    linear = nn.Linear(96, 70)
    layer = cls.from_linear(linear)
    assert (layer.in_features, layer.out_features) == (96, 70) and layer.bias is linear.bias
    assert layer.weight.shape == (70, 96) and layer.weight.device.type == "cpu"
    x = torch.randn(2, 5, 96)
    w = layer.dequantized_weight()
    assert w.shape == (70, 96) and w.dtype == torch.float32
    assert torch.equal(layer(x), nn.functional.linear(x, w, linear.bias))


def test_compute_dtype_and_output_dtype():
    layer = Linear4bit.from_linear(nn.Linear(64, 32).to(torch.bfloat16), compute_dtype=torch.float32)
    x = torch.randn(3, 64)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    expected = nn.functional.linear(x.to(torch.bfloat16).float(), layer.dequantized_weight(torch.float32),
                                    layer.bias.float())
    assert torch.equal(out, expected.to(torch.bfloat16))


@pytest.mark.parametrize("cls", [Linear4bit, Linear8bit])
def test_backward_gives_input_and_bias_grads_and_saves_no_float_weight(cls):
    layer = cls.from_linear(nn.Linear(128, 64))
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert (64, 128) not in saved and (128, 64) not in saved
    assert torch.allclose(x.grad, grad @ layer.dequantized_weight(), atol=1e-6)
    assert torch.allclose(layer.bias.grad, grad.sum(0))


def test_double_backward_sees_this_layers_weight():
    """backward(create_graph=True) keeps the weight it multiplied by; another layer's decode must not change it."""
    layer, other = Linear4bit.from_linear(nn.Linear(96, 70)), Linear4bit.from_linear(nn.Linear(96, 70))
    x = torch.randn(5, 96, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    other(torch.randn(5, 96, requires_grad=True)).sum().backward()
    (second,) = torch.autograd.grad(grad_x.square().sum(), x)
    w = layer.dequantized_weight()
    ref_x = x.detach().clone().requires_grad_()
    (ref_grad_x,) = torch.autograd.grad(nn.functional.linear(ref_x, w, layer.bias.detach()).square().sum(), ref_x,
                                        create_graph=True)
    (expected,) = torch.autograd.grad(ref_grad_x.square().sum(), ref_x)
    assert torch.allclose(second, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8"])
def test_quantize_model_replaces_every_linear_but_the_head(name):
    model = make_model("llama")
    inputs = model_inputs("llama")
    before = logits(model, inputs)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    quantize_model(model, **quantize_arguments(name))
    bits = 8 if name == "int8" else 4
    cls = Linear4bit if bits == 4 else Linear8bit
    assert sum(isinstance(m, cls) for m in model.modules()) == n_linear - 1
    assert type(model.lm_head) is nn.Linear
    if bits == 4:
        assert all(m.weight.quant_type == name for m in model.modules() if isinstance(m, Linear4bit))
    tolerance = 0.1 if bits == 4 else 0.01
    assert (logits(model, inputs) - before).abs().max() < tolerance


def test_gpt2_conv1d_is_quantized_in_out_layout():
    model = make_model("gpt2")
    inputs = model_inputs("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out)
    before = logits(model, inputs)
    quantize_model(model, skip_modules=["c_proj"])
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Linear4bit) and layer.weight.shape == (96, 32)
    assert (layer.dequantized_weight() - c_attn.t()).abs().max() < 0.05
    assert type(model.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    assert (logits(model, inputs) - before).abs().max() < 0.1


def test_explicit_modules_and_errors():
    model = make_model("llama")
    quantize_model(model, modules=["model.layers.0.mlp.down_proj"])
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 1
    with pytest.raises(ValueError, match=r"model\.embed_tokens.*Embedding"):
        quantize_model(model, modules=["model.embed_tokens"])
    with pytest.raises(ValueError, match="no module named"):
        quantize_model(model, modules=["nope"])
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, bits=3)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantize_model(model, quant_type="fp8")
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 1  # refused before any change
    with pytest.raises(ValueError, match="expected one of nf4, fp4, int8"):
        quantize_arguments("nf3")
    with pytest.raises(ValueError, match="Conv2d"):
        quantize_model(nn.Sequential(nn.Conv2d(3, 3, 3)), modules=["0"])


def test_sizes_not_divisible_by_the_block_are_padded():
    layer = Linear4bit.from_linear(nn.Linear(33, 7))
    assert layer.weight.absmax.numel() == 4  # 231 weights -> 3 full blocks and one of 39
    assert layer(torch.randn(2, 33)).shape == (2, 7)


def test_meta_linear_gives_an_empty_shell():
    with torch.device("meta"):
        linear = nn.Linear(128, 64)
    layer = Linear4bit.from_linear(linear)
    assert isinstance(layer.weight, Weight4bit) and layer.weight.packed.is_meta and layer.weight.shape == (64, 128)
