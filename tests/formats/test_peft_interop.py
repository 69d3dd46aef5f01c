"""Adapters move between deltatune and HF PEFT with identical outputs (PEFT is the anchor)."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.conftest import logits, make_model, model_inputs, perturb
from tests.conftest import quiet as _quiet

CASES = [
    # (model kind, config kwargs shared by both libraries)
    ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    ("llama", {"r": 4, "lora_alpha": 16, "target_modules": "all-linear", "use_rslora": True}),
    ("llama", {"r": 2, "lora_alpha": 4, "target_modules": ["embed_tokens", "o_proj"]}),
    ("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
               "modules_to_save": ["lm_head"], "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"k_proj": 3}}),
    ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "bias": "all"}),
    ("bert", {"r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS"}),
    ("bert", {"r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS", "target_modules": ["query", "dense"],
              "layers_to_transform": [1], "layers_pattern": "layer", "lora_dropout": 0.1}),
    ("t5", {"r": 4, "lora_alpha": 8, "target_modules": r".*(SelfAttention|EncDecAttention)\.(q|v)"}),
]
IDS = [f"{kind}-{i}" for i, (kind, _) in enumerate(CASES)]


@pytest.mark.parametrize(("kind", "kwargs"), CASES, ids=IDS)
def test_deltatune_adapter_loads_in_peft_with_same_logits(kind, kwargs, tmp_path):
    base = make_model(kind)
    inputs = model_inputs(kind)
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**copy.deepcopy(kwargs))).eval()
    perturb(ours)
    expected = logits(ours, inputs)
    assert (expected - logits(base, inputs)).abs().max() > 1e-3  # the adapter really does something
    ours.save_pretrained(tmp_path)

    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
    assert (logits(theirs, inputs) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("kind", "kwargs"), CASES, ids=IDS)
def test_peft_adapter_loads_in_deltatune_with_same_logits(kind, kwargs, tmp_path):
    base = make_model(kind)
    inputs = model_inputs(kind)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kwargs))).eval()
    perturb(theirs)
    expected = logits(theirs, inputs)
    assert (expected - logits(base, inputs)).abs().max() > 1e-3
    _quiet(theirs.save_pretrained, tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PEFT file must load without complaint
        ours = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (logits(ours, inputs) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("kind", "kwargs"), CASES[:1] + CASES[4:6], ids=["llama", "gpt2", "bert"])
def test_file_has_peft_tensor_names_and_config_keys(kind, kwargs, tmp_path):
    base = make_model(kind)
    dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**copy.deepcopy(kwargs))).save_pretrained(tmp_path / "dt")
    _quiet(_quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kwargs))).save_pretrained,
           tmp_path / "peft")
    ours = load_file(tmp_path / "dt" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    config = json.loads((tmp_path / "dt" / "adapter_config.json").read_text())
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)} | {"auto_mapping"}
    assert set(config) <= peft_fields
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True


def test_embedding_tensor_names(tmp_path):
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2, target_modules=["embed_tokens"]))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {"base_model.model.model.embed_tokens.lora_embedding_A",
                    "base_model.model.model.embed_tokens.lora_embedding_B"}


def test_named_adapters_go_to_subfolders_and_load_in_peft(tmp_path):
    base = make_model("llama")
    inputs = model_inputs("llama")
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    ours.add_adapter("other", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    perturb(ours)
    ours.set_adapter("other")
    expected = logits(ours, inputs)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "other").eval()
    assert (logits(theirs, inputs) - expected).abs().max() <= 1e-5


def test_peft_config_from_newer_version_is_tolerated(tmp_path):
    base = make_model("llama")
    dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=2)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["some_future_option"] = 3
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="some_future_option"):
        dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_legacy_bin_loads_with_weights_only(tmp_path):
    base = make_model("llama")
    inputs = model_inputs("llama")
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=2)).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(ours, inputs))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradients_match_peft(kind, tmp_path):
    """Same adapter weights, same batch: the same loss and the same gradient for every adapter tensor."""
    base = make_model(kind)
    inputs = model_inputs(kind)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**kwargs))
    perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path, is_trainable=True)
    grads = []
    for model in (ours, theirs):
        model.eval()  # no dropout anywhere: the two runs must be identical
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads.append({n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("merge", [False, True], ids=["unload", "merge_and_unload"])
def test_unload_keeps_the_trained_modules_to_save_copy_as_peft_does(merge, tmp_path):
    """PEFT's unload() and merge_and_unload() both keep the active adapter's trained classifier, not the original."""
    base = make_model("bert")
    inputs = model_inputs("bert")
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS")).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
    trained_head = ours.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(trained_head, base.classifier.weight)

    ours_plain = ours.merge_and_unload() if merge else ours.unload()
    theirs_plain = theirs.merge_and_unload() if merge else theirs.unload()
    assert torch.equal(ours_plain.classifier.weight, trained_head)
    ours_state, theirs_state = ours_plain.state_dict(), theirs_plain.state_dict()
    assert sorted(ours_state) == sorted(theirs_state)
    for key, value in theirs_state.items():
        assert torch.allclose(ours_state[key], value, atol=1e-6), key
    assert torch.allclose(logits(ours_plain, inputs), logits(theirs_plain, inputs), atol=1e-5)


def test_unload_of_a_module_the_active_adapter_does_not_save_gives_the_original():
    base = make_model("llama")
    model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    perturb(model)
    original_head = model.base_model.model.lm_head.original_module
    assert model.unload().lm_head is original_head  # "default" is active and has no copy of lm_head
