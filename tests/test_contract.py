"""One table, one set of checks, every method and model shape (PEFT's table-driven tester, our checks).

Each row is (name, tiny model, config factory). Every row must: leave the output unchanged at
initialisation, train only adapter parameters, give the same output merged and unmerged, survive a
save/load round trip, and give the base output inside ``disable_adapter()``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from tests.conftest import logits, make_model, model_inputs, perturb

TABLE = [
    ("lora-llama-qv", "llama", lambda: dt.LoraConfig(r=4, lora_alpha=8)),
    ("lora-llama-all-linear-gaussian", "llama",
     lambda: dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian")),
    ("lora-llama-embedding", "llama", lambda: dt.LoraConfig(r=4, target_modules=["embed_tokens", "down_proj"])),
    ("lora-llama-head", "llama", lambda: dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("lora-qwen2-rslora", "qwen2", lambda: dt.LoraConfig(r=8, lora_alpha=4, use_rslora=True)),
    ("lora-gpt2-conv1d", "gpt2", lambda: dt.LoraConfig(r=4, fan_in_fan_out=True, bias="lora_only")),
    ("lora-bert-seqcls", "bert", lambda: dt.LoraConfig(r=4, task_type=dt.TaskType.SEQ_CLS)),
    ("lora-t5-default", "t5", lambda: dt.LoraConfig(r=4)),
    ("dora-llama-all-linear-embedding", "llama",
     lambda: dt.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"], use_dora=True)),
    ("dora-gpt2-conv1d", "gpt2", lambda: dt.LoraConfig(r=4, fan_in_fan_out=True, use_dora=True)),
]
IDS = [row[0] for row in TABLE]


@pytest.fixture(params=TABLE, ids=IDS)
def case(request):
    _, kind, make_config = request.param
    base = make_model(kind)
    return kind, base, make_config


def test_output_unchanged_at_init(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = dt.get_peft_model(copy.deepcopy(base), make_config()).eval()
    assert torch.allclose(logits(model, inputs), logits(base, inputs), atol=1e-6)


def test_only_adapter_parameters_train(case):
    kind, base, make_config = case
    config = make_config()
    model = dt.get_peft_model(copy.deepcopy(base), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        is_adapter = "lora_" in name or ".modules_to_save." in name
        is_bias = config.bias != "none" and name.endswith("base_layer.bias")
        assert is_adapter or is_bias, name
    # and the gradient reaches exactly those
    model.train()
    out = model(**model_inputs(kind)).logits
    perturb(model)  # B != 0 so that A gets a gradient too
    out = model(**model_inputs(kind)).logits
    out.square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


def test_merged_equals_unmerged(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = dt.get_peft_model(copy.deepcopy(base), make_config()).eval()
    perturb(model)
    expected = logits(model, inputs)
    model.merge_adapter()
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5)
    merged = model.merge_and_unload()
    assert not list(adapter_layers(merged))
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5)


def test_save_load_round_trip(case, tmp_path):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = dt.get_peft_model(copy.deepcopy(base), make_config()).eval()
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False by default
    trainable = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_disable_adapter_gives_base_output(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = dt.get_peft_model(copy.deepcopy(base), make_config()).eval()
    perturb(model)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, logits(base, inputs), atol=1e-4)
    with model.disable_adapter():
        assert torch.allclose(logits(model, inputs), logits(base, inputs), atol=1e-6)
    assert torch.equal(logits(model, inputs), adapted)
