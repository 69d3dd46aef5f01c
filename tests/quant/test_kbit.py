"""prepare_model_for_kbit_training: frozen, fp32 small params, checkpointing, and a backward that reaches LoRA."""

from __future__ import annotations

import torch

from deltatune.quant import Linear4bit, prepare_model_for_kbit_training, quantize_model
from tests.conftest import make_model, model_inputs


def test_prepare_freezes_upcasts_and_checkpoints():
    model = quantize_model(make_model("llama").to(torch.bfloat16))
    layer = model.model.layers[0].self_attn.q_proj
    packed = layer.weight.packed.clone()
    prepare_model_for_kbit_training(model)
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(layer.weight.packed, packed) and layer.weight.dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
    # a trainable extra on a quantized layer gets a gradient through checkpointed blocks
    extra = torch.nn.Parameter(torch.zeros(layer.out_features))
    layer.register_forward_hook(lambda m, i, o: o + extra)
    model.train()
    model(**model_inputs("llama"), labels=model_inputs("llama")["input_ids"]).loss.backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    assert isinstance(layer, Linear4bit)


def test_prepare_without_checkpointing_on_a_plain_module():
    module = torch.nn.Sequential(torch.nn.LayerNorm(4).half())
    prepare_model_for_kbit_training(module, use_gradient_checkpointing=False)
    assert module[0].weight.dtype == torch.float32 and not module[0].weight.requires_grad
