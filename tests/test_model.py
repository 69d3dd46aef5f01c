"""PeftModel: adapters by name, switching, mixed batches, counting, merging, unloading."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from tests.conftest import logits, make_model, model_inputs, perturb


@pytest.fixture
def two_adapters():
    base = make_model("llama")
    model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"]))
    perturb(model)
    model.eval()
    return base, model


def test_print_trainable_parameters_matches_peft(capsys):
    base = make_model("llama")
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    trainable, total = ours.get_nb_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    # 2 layers x (q: 8*32 + 32*8, v: 8*32 + 16*8)
    assert trainable == 2 * ((8 * 32 + 32 * 8) + (8 * 32 + 8 * 16))


def test_add_adapter_does_not_activate_and_set_adapter_switches(two_adapters):
    base, model = two_adapters
    inputs = model_inputs("llama")
    assert model.active_adapter == "default"
    out_default = logits(model, inputs)
    model.set_adapter("b")
    assert model.active_adapters == ["b"]
    out_b = logits(model, inputs)
    assert not torch.allclose(out_default, out_b, atol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)


def test_mixed_batch_rows_use_their_own_adapter(two_adapters):
    base, model = two_adapters
    inputs = model_inputs("llama", batch=3)
    per_adapter = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        per_adapter[name] = logits(model, inputs)
    per_adapter["__base__"] = logits(base, inputs)
    names = ["b", "__base__", "default"]
    mixed = logits(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], per_adapter[name][row], atol=1e-5), name


def test_mixed_batch_errors(two_adapters):
    _, model = two_adapters
    inputs = model_inputs("llama", batch=3)
    with pytest.raises(ValueError, match="unknown adapters"):
        model(**inputs, adapter_names=["nope", "b", "b"])
    with pytest.raises(ValueError, match="3 rows"):
        model(**inputs, adapter_names=["b", "b"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model(**inputs, adapter_names=["b", "b", "b"])


def test_generate_with_adapter_names_matches_single_adapter_generation(two_adapters):
    _, model = two_adapters
    prompt = model_inputs("llama", batch=2, length=4)["input_ids"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    expected = []
    for row, name in enumerate(["b", "default"]):
        model.set_adapter(name)
        expected.append(model.generate(input_ids=prompt[row:row + 1], **kwargs)[0])
    mixed = model.generate(input_ids=prompt, adapter_names=["b", "default"], **kwargs)
    assert torch.equal(mixed[0], expected[0]) and torch.equal(mixed[1], expected[1])
    beams = model.generate(input_ids=prompt, adapter_names=["b", "default"], num_beams=2, **kwargs)
    assert beams.shape[0] == 2


def test_delete_adapter(two_adapters):
    base, model = two_adapters
    model.set_adapter("b")
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    names = [n for n, _ in adapter_layers(model)]
    assert not any("o_proj" in n or "lm_head" in n for n in names)  # layers left empty are unwrapped
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("default")


def test_unload_returns_untouched_base(two_adapters):
    base, model = two_adapters
    inputs = model_inputs("llama")
    model.merge_adapter()
    plain = model.unload()
    assert not list(adapter_layers(plain))
    assert torch.allclose(logits(plain, inputs), logits(base, inputs), atol=1e-5)


def test_merge_and_unload_uses_trained_head(two_adapters):
    _, model = two_adapters
    inputs = model_inputs("llama")
    model.set_adapter("b")
    expected = logits(model, inputs)
    merged = model.merge_and_unload()
    assert isinstance(merged.lm_head, torch.nn.Linear)
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5)


def test_load_adapter_adds_named_adapter(two_adapters, tmp_path):
    base, model = two_adapters
    inputs = model_inputs("llama")
    model.set_adapter("b")
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    other = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=2))
    other.load_adapter(tmp_path / "b", adapter_name="task_b")
    other.set_adapter("task_b")
    assert torch.allclose(logits(other, inputs), expected, atol=1e-6)


def test_training_step_changes_only_adapter():
    base = make_model("llama")
    model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = model_inputs("llama")
    for _ in range(2):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_attribute_pass_through():
    base = make_model("llama")
    model = dt.get_peft_model(base, dt.LoraConfig(r=2))
    assert model.config is base.config and model.get_base_model() is base
