"""Bad input gets an error that says what was wrong and what to do, and leaves the model as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from tests.conftest import logits, make_model, model_inputs


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not list(adapter_layers(model))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture
def saved(tmp_path):
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=4))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_targets_that_match_nothing_leave_model_untouched():
    model = make_model("llama")
    before = _state(model)
    with pytest.raises(ValueError, match="matched no module.*Closest module names.*q_proj"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_prj"]))
    _assert_untouched(model, before)


def test_unsupported_layer_type_is_named_and_nothing_changes():
    model = make_model("llama")
    before = _state(model)
    with pytest.raises(ValueError, match="cannot wrap a LlamaMLP"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_proj", "mlp"]))
    _assert_untouched(model, before)


def test_bad_modules_to_save_rolls_back_lora_layers():
    model = make_model("llama")
    before = _state(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_proj"], modules_to_save=["no_such_head"]))
    _assert_untouched(model, before)


def test_shape_mismatch_names_key_and_both_shapes(saved):
    model = make_model("llama")
    before = _state(model)
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight: file has \(4, 31\), model has \(4, 32\)"):
        dt.PeftModel.from_pretrained(model, saved)
    _assert_untouched(model, before)


def test_rank_mismatch_between_file_and_config(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = 8
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"file has \(4, 32\), model has \(8, 32\)"):
        dt.PeftModel.from_pretrained(make_model("llama"), saved)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dt.PeftModel.from_pretrained(make_model("llama"), tmp_path / "nope")


def test_missing_config(saved):
    (saved / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        dt.PeftModel.from_pretrained(make_model("llama"), saved)


def test_malformed_config(saved):
    (saved / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,,}')
    with pytest.raises(ValueError, match="not valid JSON .line 1"):
        dt.PeftModel.from_pretrained(make_model("llama"), saved)
    (saved / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(ValueError, match="no 'peft_type'"):
        dt.PeftModel.from_pretrained(make_model("llama"), saved)


def test_unknown_peft_type(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["peft_type"] = "SUPER_LORA"
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="SUPER_LORA.*known: \\[.*'LORA'"):
        dt.PeftModel.from_pretrained(make_model("llama"), saved)


def test_feature_we_lack_is_refused(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["use_qalora"] = True
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_qalora"):
        dt.PeftModel.from_pretrained(make_model("llama"), saved)


def test_missing_weights_file(saved):
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        dt.PeftModel.from_pretrained(make_model("llama"), saved)


def test_pickled_bin_is_never_unpickled(saved, tmp_path):
    (saved / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, saved / "adapter_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        dt.PeftModel.from_pretrained(make_model("llama"), saved)
    assert not marker.exists()


def test_duplicate_adapter_name_and_double_wrap():
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2))
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("default", dt.LoraConfig(r=2))
    with pytest.raises(ValueError, match="already a PeftModel"):
        dt.get_peft_model(model, dt.LoraConfig(r=2))
    with pytest.raises(ValueError, match="No adapter named"):
        model.set_adapter("missing")


def test_failed_load_adapter_keeps_existing_adapter_working(saved, tmp_path):
    base = make_model("llama")
    model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    inputs = model_inputs("llama")
    before = logits(model, inputs)
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = torch.zeros(3, 3)
    save_file(tensors, saved / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="v_proj.lora_B.weight"):
        model.load_adapter(saved, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert not any("v_proj" in n for n, _ in adapter_layers(model))
    assert torch.equal(logits(model, inputs), before)
