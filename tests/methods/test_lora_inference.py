"""LoRA's inference short path (``LoraLayer._inference_call``) on whole models: logits equal to the general path,
and no parameter touched."""

from __future__ import annotations

import copy

import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lora import LoraLayer
from tests.conftest import logits, make_model, model_inputs, perturb


def _general(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose LoRA layers never take the short path."""
    other = copy.deepcopy(model)
    for module in other.modules():
        if isinstance(module, LoraLayer):
            module._plain_linear = False
    return other


def _layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _model(adapters: tuple[str, ...] = ("default",)) -> nn.Module:
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = dt.get_peft_model(make_model("llama"), config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    return model.eval()


def _taken(model: nn.Module) -> list[bool]:
    """Per LoRA layer, whether any call since `_count_short_path` went through the short path."""
    return [layer._short_path_calls > 0 for layer in _layers(model)]


def _count_short_path(model: nn.Module) -> None:
    for layer in _layers(model):
        layer._short_path_calls = 0
        original = layer._inference_call

        def counted(x, layer=layer, original=original):
            out = original(x)
            layer._short_path_calls += out is not None
            return out

        layer._inference_call = counted


def test_short_path_logits_equal_the_general_path_and_leave_the_parameters_alone():
    model = _model()
    _count_short_path(model)
    inputs = model_inputs("llama")
    expected = logits(_general(model), inputs)
    before = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    got = logits(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5)
    assert all(_taken(model))
    for name, param in model.named_parameters():  # same objects, same storage, same values
        same, pointer, value = before[name]
        assert param is same and param.data_ptr() == pointer and torch.equal(param, value), name
    with torch.inference_mode():  # and the same under inference_mode
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)


def test_training_after_short_path_inference_trains_every_adapter_parameter():
    model = _model()
    inputs = model_inputs("llama")
    with torch.inference_mode():
        model(**inputs)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    assert torch.allclose(logits(model, inputs), logits(_general(model), inputs), atol=1e-5)


def test_switching_adapters_and_changing_dtype_keep_the_short_path_exact():
    model = _model(("one", "two"))
    inputs = model_inputs("llama")
    for name in ("one", "two", "one"):
        model.set_adapter(name)
        assert torch.allclose(logits(model, inputs), logits(_general(model), inputs), atol=1e-5), name
    model.double()
    _count_short_path(model)
    assert torch.allclose(logits(model, inputs), logits(_general(model), inputs), atol=1e-10)
    assert all(_taken(model))
