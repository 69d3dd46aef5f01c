"""QLoRA: LoRA beside a 4-bit (or 8-bit) frozen base, with the same API as on a float base."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from deltatune.quant import Linear4bit, Linear8bit, prepare_model_for_kbit_training, quantize_arguments, quantize_model
from tests.conftest import logits, make_model, model_inputs, perturb


@pytest.fixture(params=["nf4", "fp4", "int8"])
def quantized_llama(request):
    model = make_model("llama")
    arguments = quantize_arguments(request.param)
    quantize_model(model, **arguments)
    return arguments["bits"], model


def test_lora_wraps_quantized_layers_and_starts_as_base(quantized_llama):
    bits, base = quantized_llama
    inputs = model_inputs("llama")
    model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules="all-linear"))
    layers = [layer for _, layer in adapter_layers(model)]
    assert len(layers) == 2 * 7
    assert all(isinstance(layer.base_layer, Linear4bit if bits == 4 else Linear8bit) for layer in layers)
    assert torch.allclose(logits(model, inputs), logits(base, inputs), atol=1e-6)


def test_training_step_reaches_only_lora(quantized_llama):
    _, base = quantized_llama
    model = dt.get_peft_model(prepare_model_for_kbit_training(copy.deepcopy(base)), dt.LoraConfig(r=4))
    perturb(model)
    inputs = model_inputs("llama")
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)


def test_quantized_output_matches_float_lora_on_dequantized_weights(quantized_llama):
    """base(x) + s B A x on codes equals a float model whose weights are the dequantized codes."""
    _, base = quantized_llama
    inputs = model_inputs("llama")
    q_model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(q_model)
    expected = logits(q_model, inputs)
    merged = q_model.merge_and_unload()  # quantized layers with LoRA become float Linear with the update
    adapted = [m for n, m in merged.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert adapted and all(type(m) is torch.nn.Linear for m in adapted)
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5)


def test_merge_into_codes_is_refused(quantized_llama):
    _, base = quantized_llama
    model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4))
    with pytest.raises(ValueError, match="quantized"):
        model.merge_adapter()


def test_qlora_adapter_loads_on_float_base_and_in_peft(tmp_path):
    """The adapter file does not depend on how the base was stored."""
    float_base = make_model("llama")
    q_base = quantize_model(copy.deepcopy(float_base), bits=4)
    model = dt.get_peft_model(q_base, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(copy.deepcopy(float_base), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(float_base), tmp_path).eval()
    inputs = model_inputs("llama")
    assert torch.allclose(logits(ours, inputs), logits(theirs, inputs), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_export_dequantizes_to_requested_dtype(dtype):
    from deltatune.quant import dequantize_model

    base = quantize_model(make_model("llama"), bits=4)
    inputs = model_inputs("llama")
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["q_proj"]))
    perturb(model)
    expected = logits(model, inputs)
    plain = dequantize_model(model.merge_and_unload(), dtype)
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in plain.modules())
    assert {p.dtype for p in plain.parameters()} == {dtype}
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    assert torch.allclose(logits(plain.float(), inputs), expected, atol=tolerance)


def test_requantization_error_is_reported_and_small():
    from deltatune.quant import requantization_error

    model = make_model("llama")
    error = requantization_error(model, bits=4)
    assert 0.0 < error["relative_rms_error"] < 0.15 and error["max_abs_error"] > 0
    assert requantization_error(model, bits=8)["relative_rms_error"] < error["relative_rms_error"]
