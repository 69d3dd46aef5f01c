"""LoRA's inference short path (methods/lora_inference.py): [W; A] stacked into one matrix, views for W and A."""

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


def test_stacked_logits_equal_the_general_path_and_no_weight_is_held_twice():
    model = _model()
    inputs = model_inputs("llama")
    expected = logits(_general(model), inputs)
    params_before = {n: p for n, p in model.named_parameters()}
    got = logits(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5)
    assert all(p is params_before[n] for n, p in model.named_parameters())  # the same Parameter objects
    for layer in _layers(model):
        stacked = layer._stacked
        assert stacked is not None and stacked.name == "default"
        weight, down = layer.base_layer.weight, layer.lora_A["default"].weight
        assert weight.untyped_storage().data_ptr() == down.untyped_storage().data_ptr() == stacked.matrix.data_ptr()
        assert stacked.matrix.untyped_storage().nbytes() == (weight.numel() + down.numel()) * weight.element_size()
    with torch.inference_mode():  # and the same under inference_mode
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)


def test_training_after_stacked_inference_trains_the_same_parameters():
    model = _model()
    inputs = model_inputs("llama")
    with torch.inference_mode():
        model(**inputs)  # stacks under inference_mode: no inference tensor may reach training
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in params.items()}
    model.train()  # back to plain storage
    assert all(layer._stacked is None for layer in _layers(model))
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    assert torch.allclose(logits(model, inputs), logits(_general(model), inputs), atol=1e-5)
    for layer in _layers(model):
        assert layer._stacked.holds("default", layer.base_layer.weight, layer.lora_A["default"].weight,
                                    layer.base_layer.bias)


def test_switching_adapters_and_moving_the_model_restack():
    model = _model(("one", "two"))
    inputs = model_inputs("llama")
    for name in ("one", "two", "one"):
        model.set_adapter(name)
        assert torch.allclose(logits(model, inputs), logits(_general(model), inputs), atol=1e-5), name
    q_proj = next(layer for layer in _layers(model) if "two" in layer.r)
    other_a = q_proj.lora_A["two"].weight
    assert other_a.untyped_storage().nbytes() == other_a.numel() * other_a.element_size()  # released on switch
    model.double()  # new storage for every tensor: the stacking is rebuilt on the next call
    inputs64 = model_inputs("llama")
    assert torch.allclose(logits(model, inputs64), logits(_general(model), inputs64), atol=1e-10)
    assert q_proj._stacked.matrix.dtype == torch.float64


def test_unload_and_save_after_stacking_keep_nothing_of_the_stack(tmp_path):
    model = _model()
    inputs = model_inputs("llama")
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    loaded = dt.PeftModel.from_pretrained(make_model("llama"), tmp_path / "adapter").eval()
    assert torch.allclose(logits(loaded, inputs), expected, atol=1e-5)
    merged = model.merge_and_unload()
    for module in merged.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-4)
    other = _model()
    logits(other, inputs)
    unloaded = other.unload()
    for module in unloaded.modules():
        if isinstance(module, nn.Linear):
            assert module.weight.untyped_storage().nbytes() == module.weight.numel() * module.weight.element_size()


def test_train_mode_and_state_dicts_never_hold_the_stack(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model()
    inputs = model_inputs("llama")
    expected = logits(model, inputs)
    assert all(layer._stacked is not None for layer in _layers(model))
    state = model.state_dict()  # gives back plain storage first
    assert all(layer._stacked is None for layer in _layers(model))
    pointers = [t.untyped_storage().data_ptr() for t in state.values()]
    tied = model.get_input_embeddings().weight.untyped_storage().data_ptr()
    assert len(pointers) - pointers.count(tied) == len(set(pointers) - {tied})  # nothing else shares storage
    save_file({k: v for k, v in state.items() if "lm_head" not in k}, tmp_path / "all.safetensors")
    assert set(load_file(tmp_path / "all.safetensors")) == {k for k in state if "lm_head" not in k}
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5)  # stacked again on the way
    model.train()
    assert all(layer._stacked is None for layer in _layers(model))
    with torch.no_grad():
        model(**inputs)  # a no-grad call in training mode takes the general path
    assert all(layer._stacked is None for layer in _layers(model))
