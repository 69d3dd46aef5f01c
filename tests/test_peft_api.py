"""The API a PEFT user reaches for first, with HF PEFT as the oracle: names, signatures and behaviour."""

from __future__ import annotations

import inspect
import io
import os
from contextlib import redirect_stdout

import peft
import pytest
import torch

import deltatune

from .conftest import logits, make_model, model_inputs, perturb

# Public names that exist in both libraries (module-level).
NAMES = [
    "LoraConfig", "PeftConfig", "PeftModel", "PeftType", "TaskType", "IA3Config", "PromptTuningConfig",
    "PromptEncoderConfig", "PrefixTuningConfig",
    "PeftModelForCausalLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForFeatureExtraction",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction",
    "get_peft_model", "get_peft_model_state_dict", "set_peft_model_state_dict", "inject_adapter_in_model",
    "prepare_model_for_kbit_training", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
]
# (name, attribute): callables whose every PEFT parameter we take, with PEFT's default.
SIGNATURES = [
    ("get_peft_model", None), ("get_peft_model_state_dict", None), ("set_peft_model_state_dict", None),
    ("inject_adapter_in_model", None), ("prepare_model_for_kbit_training", None),
    ("PeftModel", "from_pretrained"), ("PeftModel", "load_adapter"), ("PeftModel", "save_pretrained"),
    ("PeftModel", "add_adapter"), ("PeftModel", "set_adapter"), ("PeftModel", "delete_adapter"),
    ("PeftModel", "disable_adapter"), ("PeftModel", "get_nb_trainable_parameters"),
    ("PeftModel", "print_trainable_parameters"), ("PeftModel", "get_base_model"),
    ("PeftConfig", "from_pretrained"), ("LoraConfig", "from_pretrained"),
    ("AutoPeftModelForCausalLM", "from_pretrained"),
    *[(name, "forward") for name in NAMES if name.startswith("PeftModelFor")],
]
# Methods PEFT's PeftModel reaches through its tuner (``model.merge_and_unload()`` and so on).
TUNER_METHODS = ["merge_and_unload", "unload", "merge_adapter", "unmerge_adapter", "enable_adapter_layers",
                 "disable_adapter_layers"]
# Deliberate differences, each documented in the README ("Coming from PEFT").
DEFAULTS_THAT_DIFFER = {("PeftModel", "save_pretrained", "save_embedding_layers"): False}


def _resolve(module, name, attribute):
    obj = getattr(module, name)
    return obj if attribute is None else getattr(obj, attribute)


@pytest.mark.parametrize("name", NAMES)
def test_peft_name_exists(name):
    assert hasattr(peft, name), f"peft has no {name}: fix the table"
    assert hasattr(deltatune, name)


@pytest.mark.parametrize(("name", "attribute"), SIGNATURES, ids=lambda v: str(v))
def test_signature_takes_every_peft_parameter_with_its_default(name, attribute):
    theirs = inspect.signature(_resolve(peft, name, attribute)).parameters
    ours = inspect.signature(_resolve(deltatune, name, attribute)).parameters
    for param_name, param in theirs.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values()), f"{name} needs **kwargs"
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        assert param_name in ours, f"{name}.{attribute}: missing parameter {param_name!r}"
        expected = DEFAULTS_THAT_DIFFER.get((name, attribute, param_name), param.default)
        assert ours[param_name].default == expected, f"{name}.{attribute}({param_name}=...) default differs"


@pytest.mark.parametrize("method", TUNER_METHODS)
def test_tuner_methods_are_on_the_model(method):
    assert callable(getattr(deltatune.PeftModel, method))


def _bert(cls):
    from transformers import BertConfig

    return lambda: cls(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64))


@pytest.mark.parametrize("task_type", [t.value for t in deltatune.TaskType] + [None])
def test_get_peft_model_returns_the_task_class(task_type):
    import transformers

    make = {"SEQ_2_SEQ_LM": lambda: make_model("t5"), "SEQ_CLS": lambda: make_model("bert"),
            "TOKEN_CLS": _bert(transformers.BertForTokenClassification),
            "QUESTION_ANS": _bert(transformers.BertForQuestionAnswering),
            "FEATURE_EXTRACTION": _bert(transformers.BertModel)}.get(task_type, lambda: make_model("llama"))
    targets = ["q", "q_proj", "query"]
    torch.manual_seed(0)
    ours = deltatune.get_peft_model(make(), deltatune.LoraConfig(task_type=task_type, target_modules=targets))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(task_type=task_type, target_modules=targets))
    assert type(ours).__name__ == type(theirs).__name__
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)


def _pair(kind="llama", **config):
    config = {"target_modules": ["q_proj", "v_proj"], "r": 4, **config}
    ours = deltatune.get_peft_model(make_model(kind), deltatune.LoraConfig(**config))
    theirs = peft.get_peft_model(make_model(kind), peft.LoraConfig(**config))
    return ours, theirs


def test_targeted_module_names_and_state_dict_keys_match_peft():
    ours, theirs = _pair(target_modules="all-linear", task_type="CAUSAL_LM")
    assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names)
    assert sorted(ours.base_model.targeted_module_names) == sorted(theirs.base_model.targeted_module_names)
    assert sorted(deltatune.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))


def test_set_peft_model_state_dict_takes_peft_tensors():
    ours, theirs = _pair()
    perturb(theirs)
    result = deltatune.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert result.unexpected_keys == [] and result.missing_keys == []
    inputs = model_inputs("llama")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)


def test_get_peft_model_state_dict_from_a_full_state_dict():
    ours, _ = _pair()
    full = {k: torch.full_like(v, 7.0) for k, v in ours.state_dict().items()}
    tensors = deltatune.get_peft_model_state_dict(ours, state_dict=full)
    assert tensors and all(bool((t == 7.0).all()) for t in tensors.values())


def test_inject_adapter_in_model_matches_peft():
    ours_model, theirs_model = make_model("llama"), make_model("llama")
    config = {"target_modules": ["q_proj", "up_proj"], "r": 4}
    ours = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config), ours_model)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), theirs_model)
    assert ours is ours_model
    ours_keys = sorted(deltatune.get_peft_model_state_dict(ours))
    assert ours_keys == sorted(peft.get_peft_model_state_dict(theirs))
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    # state_dict= picks the modules from the keys alone
    keyed = deltatune.inject_adapter_in_model(deltatune.LoraConfig(r=4), make_model("llama"),
                                              state_dict=peft.get_peft_model_state_dict(theirs))
    assert sorted(deltatune.get_peft_model_state_dict(keyed)) == ours_keys


def test_print_trainable_parameters_matches_peft():
    ours, theirs = _pair(target_modules="all-linear")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    printed = []
    for model in (ours, theirs):
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            model.print_trainable_parameters()
        printed.append(buffer.getvalue())
    assert printed[0] == printed[1]


def test_set_adapter_inference_mode_and_adapter_layer_switches_match_peft():
    ours, theirs = _pair()
    perturb(ours), perturb(theirs)
    for model in (ours, theirs):
        model.add_adapter("other", type(model.peft_config["default"])(target_modules=["q_proj"], r=2))
        model.set_adapter("other", inference_mode=True)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == []
    assert [n for n, p in theirs.named_parameters() if p.requires_grad] == []
    inputs = model_inputs("llama")
    base = logits(make_model("llama"), inputs)
    for model in (ours, theirs):
        model.set_adapter("default")
        model.disable_adapter_layers()
        torch.testing.assert_close(logits(model, inputs), base, rtol=1e-5, atol=1e-5)
        model.enable_adapter_layers()
        assert not torch.allclose(logits(model, inputs), base, atol=1e-4)


def test_set_adapter_leaves_base_parameters_the_user_unfroze():
    for model in _pair():
        embed = model.get_base_model().model.embed_tokens.weight
        embed.requires_grad_(True)
        model.add_adapter("b", type(model.peft_config["default"])(target_modules=["v_proj"]))
        model.set_adapter("b")
        assert embed.requires_grad


def _saved(tmp_path, **config):
    ours = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(target_modules=["q_proj"], **config))
    perturb(ours)
    folder = tmp_path / "sub" / "adapter"
    ours.save_pretrained(folder)
    return ours, folder


def test_from_pretrained_honours_subfolder_and_torch_device(tmp_path):
    ours, folder = _saved(tmp_path)
    inputs = model_inputs("llama")
    loaded = deltatune.PeftModel.from_pretrained(make_model("llama"), tmp_path / "sub", subfolder="adapter")
    torch.testing.assert_close(logits(loaded, inputs), logits(ours, inputs))
    other = deltatune.PeftModel.from_pretrained(make_model("llama"), folder, torch_device="meta")
    assert {p.device.type for n, p in other.named_parameters() if "lora_" in n} == {"meta"}
    model = deltatune.PeftModel.from_pretrained(make_model("llama"), folder)
    model.load_adapter(folder, "second", torch_device="cpu", low_cpu_mem_usage=True)
    assert "second" in model.peft_config


def test_from_pretrained_key_mapping_renames_file_keys(tmp_path):
    ours, folder = _saved(tmp_path)
    renamed = deltatune.get_peft_model_state_dict(ours)
    from safetensors.torch import save_file

    save_file({k.replace("model.layers", "decoder.blocks"): v.contiguous() for k, v in renamed.items()},
              os.path.join(folder, "adapter_model.safetensors"))
    loaded = deltatune.PeftModel.from_pretrained(make_model("llama"), folder,
                                                 key_mapping={r"^decoder\.blocks": "model.layers"})
    inputs = model_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(ours, inputs))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"revision": "v2"}, ValueError, "revision"),
    ({"ephemeral_gpu_offload": True}, ValueError, "ephemeral_gpu_offload"),
    ({"no_such_option": 1}, TypeError, "no_such_option"),
])
def test_from_pretrained_refuses_what_it_cannot_honour(tmp_path, kwargs, error, message):
    _, folder = _saved(tmp_path)
    model = make_model("llama")
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(error, match=message):
        deltatune.PeftModel.from_pretrained(model, folder, **kwargs)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], v) and after[n].requires_grad == g for n, (v, g) in before.items())


def test_hub_only_options_warn_on_a_local_folder(tmp_path):
    _, folder = _saved(tmp_path)
    with pytest.warns(UserWarning, match="token"):
        deltatune.PeftModel.from_pretrained(make_model("llama"), folder, token="hf_x", cache_dir=None)


def test_load_adapter_into_an_existing_adapter_replaces_its_weights(tmp_path):
    ours, folder = _saved(tmp_path)
    fresh = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(target_modules=["q_proj"]))
    fresh.load_adapter(folder, "default", is_trainable=True)
    inputs = model_inputs("llama")
    torch.testing.assert_close(logits(fresh, inputs), logits(ours, inputs))
    assert any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)


def test_from_pretrained_picks_the_task_class_as_peft(tmp_path):
    _, folder = _saved(tmp_path, task_type="CAUSAL_LM")
    loaded = deltatune.PeftModel.from_pretrained(make_model("llama"), folder)
    reference = peft.PeftModel.from_pretrained(make_model("llama"), str(folder))
    assert type(loaded).__name__ == type(reference).__name__ == "PeftModelForCausalLM"


def test_auto_peft_model_loads_base_and_adapter_like_peft(tmp_path):
    base_dir = tmp_path / "base"
    make_model("llama").save_pretrained(base_dir)
    ours = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(
        target_modules=["q_proj"], task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir)))
    perturb(ours)
    ours.save_pretrained(tmp_path / "adapter")
    loaded = deltatune.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    reference = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(loaded, deltatune.PeftModelForCausalLM)
    inputs = model_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(reference, inputs), rtol=1e-5, atol=1e-5)


def test_save_embedding_layers_auto_follows_peft(tmp_path):
    config = {"target_modules": ["embed_tokens", "q_proj"], "r": 4}
    ours = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(**config))
    theirs = peft.get_peft_model(make_model("llama"), peft.LoraConfig(**config))
    with pytest.warns(UserWarning):
        ours.save_pretrained(tmp_path / "ours", save_embedding_layers="auto")
    theirs.save_pretrained(str(tmp_path / "peft"), save_embedding_layers="auto")
    from safetensors import safe_open

    keys = []
    for folder in ("ours", "peft"):
        with safe_open(str(tmp_path / folder / "adapter_model.safetensors"), "pt") as fh:
            keys.append(sorted(fh.keys()))
    assert keys[0] == keys[1]
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in keys[0])


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "a/b", "x.y", ""])
def test_adapter_names_that_would_escape_the_folder_are_refused(bad):
    model = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter"):
        model.add_adapter(bad, deltatune.LoraConfig(target_modules=["v_proj"]))
    assert list(model.peft_config) == ["default"]
