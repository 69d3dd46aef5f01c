"""Bottleneck adapters: AdapterHub as the oracle, the life-cycle contract, and bad input.

The oracle data (tests/methods/data/bottleneck/, made by make_fixtures.py there with AdapterHub ``adapters``
1.3.0 on transformers 4.57.6) holds tiny BERT and Llama base weights, AdapterHub SeqBnConfig (pfeiffer) and
DoubleSeqBnConfig (houlsby) adapters with random weights as AdapterHub saved them, and AdapterHub's logits.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from deltatune.methods import bottleneck, lora
from deltatune.methods.bottleneck import (
    BottleneckLayer,
    config_from_adapterhub,
    from_adapterhub_state_dict,
    read_adapterhub,
)
from tests.conftest import logits, make_model, model_inputs, perturb

DATA = os.path.join(os.path.dirname(__file__), "data", "bottleneck")
ADAPTER_KEYS = ("adapter_down", "adapter_up", "modules_to_save")


# ---- AdapterHub oracle ---------------------------------------------------------------------------------------

def _fixture_meta() -> dict:
    with open(os.path.join(DATA, "fixtures.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _reference_base(kind: str) -> torch.nn.Module:
    """The fixture's base model, rebuilt from its arguments and loaded with its saved weights."""
    args = _fixture_meta()["model_args"][kind]
    if kind == "bert":
        model = BertForMaskedLM(BertConfig(**args, attn_implementation="eager"))
    else:
        model = LlamaForCausalLM(LlamaConfig(**args, attn_implementation="eager"))
    missing, unexpected = model.load_state_dict(load_file(os.path.join(DATA, f"{kind}_base.safetensors")), strict=False)
    assert not unexpected
    assert set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}  # tied, not saved
    return model.eval()


def _reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ref = load_file(os.path.join(DATA, "reference.safetensors"))
    return {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}, ref


ORACLE = [(kind, name) for kind in ("bert", "llama") for name in ("pfeiffer", "houlsby", "pfeiffer_variant")]
# the BottleneckConfig that make_fixtures.py's AdapterHub config corresponds to
EXPECTED_CONFIG = {
    "pfeiffer": {"placement": "pfeiffer", "reduction_factor": 4, "non_linearity": "relu"},
    "houlsby": {"placement": "houlsby", "reduction_factor": 4, "non_linearity": "swish"},
    "pfeiffer_variant": {"placement": "pfeiffer", "reduction_factor": 8, "non_linearity": "gelu", "scaling": 2.0,
                         "layers_to_transform": [1]},
}


def test_fixture_base_models_agree_with_adapterhubs_transformers():
    inputs, ref = _reference()
    for kind in ("bert", "llama"):
        assert torch.allclose(logits(_reference_base(kind), inputs), ref[f"{kind}.base"], atol=1e-5)


@pytest.mark.parametrize(("kind", "name"), ORACLE, ids=[f"{k}-{n}" for k, n in ORACLE])
def test_equal_logits_to_adapterhub_via_hand_made_config(kind, name):
    """Config written by hand, weights renamed with from_adapterhub_state_dict."""
    inputs, ref = _reference()
    config = dt.BottleneckConfig(**EXPECTED_CONFIG[name])
    model = dt.get_peft_model(_reference_base(kind), config).eval()
    with safe_open(os.path.join(DATA, f"{kind}_{name}", "adapter.safetensors"), framework="pt") as fh:
        hub = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is no dict
    result = dt.set_peft_model_state_dict(model, from_adapterhub_state_dict(hub, config.placement))
    assert not result.missing_keys and not result.unexpected_keys
    out = logits(model, inputs)
    assert (out - ref[f"{kind}.base"]).abs().max() > 0.1  # the adapter matters
    assert torch.allclose(out, ref[f"{kind}.{name}"], atol=1e-5)


@pytest.mark.parametrize(("kind", "name"), ORACLE, ids=[f"{k}-{n}" for k, n in ORACLE])
def test_equal_logits_to_adapterhub_read_from_its_folder(kind, name):
    inputs, ref = _reference()
    config, tensors = read_adapterhub(os.path.join(DATA, f"{kind}_{name}"))
    for field, value in EXPECTED_CONFIG[name].items():
        assert getattr(config, field) == value, field
    model = dt.get_peft_model(_reference_base(kind), config).eval()
    dt.set_peft_model_state_dict(model, tensors)
    assert torch.allclose(logits(model, inputs), ref[f"{kind}.{name}"], atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_two_adapters_active_equal_adapterhubs_stack(kind):
    """set_adapter([a, b]) applies a, then b, as AdapterHub's Stack(a, b) (fixtures.json's "stacks")."""
    inputs, ref = _reference()
    first, second = _fixture_meta()["stacks"][kind]
    model = None
    for name in (first, second):
        config, tensors = read_adapterhub(os.path.join(DATA, f"{kind}_{name}"))
        if model is None:
            model = dt.get_peft_model(_reference_base(kind), config, adapter_name=name).eval()
        else:
            model.add_adapter(name, config)
        dt.set_peft_model_state_dict(model, tensors, adapter_name=name)
    model.set_adapter([first, second])
    assert torch.allclose(logits(model, inputs), ref[f"{kind}.stack"], atol=1e-5)


def test_adapterhub_key_mapping():
    w = torch.zeros(1)
    assert list(from_adapterhub_state_dict(
        {"bert.encoder.layer.0.attention.output.adapters.a.adapter_down.0.weight": w}, "houlsby")) == [
        "base_model.model.bert.encoder.layer.0.attention.output.adapter_down.weight"]
    llama = {"model.layers.1.attention_adapters.adapters.a.adapter_up.bias": w,
             "model.layers.1.output_adapters.adapters.a.adapter_down.0.bias": w}
    assert sorted(from_adapterhub_state_dict(llama, "houlsby", prefix="")) == [
        "model.layers.1.mlp.adapter_down.bias", "model.layers.1.self_attn.adapter_up.bias"]
    assert list(from_adapterhub_state_dict({"model.layers.1.output_adapters.adapters.a.adapter_up.weight": w},
                                           "pfeiffer", prefix="")) == ["model.layers.1.adapter_up.weight"]
    with pytest.raises(ValueError, match="attention_adapters"):
        from_adapterhub_state_dict(llama, "pfeiffer")
    with pytest.raises(ValueError, match="adapter_norm_after"):
        from_adapterhub_state_dict({"model.layers.0.output_adapters.adapters.a.adapter_norm_after.weight": w},
                                   "pfeiffer")


def test_adapterhub_options_deltatune_does_not_compute_are_refused():
    with open(os.path.join(DATA, "bert_pfeiffer", "adapter_config.json"), encoding="utf-8") as fh:
        options = json.load(fh)["config"]
    assert config_from_adapterhub(options).placement == "pfeiffer"
    for change in ({"ln_after": True}, {"use_gating": True}, {"scaling": "learned"}, {"is_parallel": True},
                   {"reduction_factor": {"default": 16}}, {"new_option": 1}):
        with pytest.raises(ValueError, match="does not compute"):
            config_from_adapterhub({**options, **change})
    with pytest.raises(ValueError, match="neither"):  # ParBn-like: no attention adapter, no LN before
        config_from_adapterhub({**options, "original_ln_before": False})


# ---- targets and sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "placement", "expected"), [
    ("bert", "pfeiffer", ["bert.encoder.layer.0.output", "bert.encoder.layer.1.output"]),
    ("bert", "houlsby", ["bert.encoder.layer.0.attention.output", "bert.encoder.layer.0.output",
                         "bert.encoder.layer.1.attention.output", "bert.encoder.layer.1.output"]),
    ("llama", "pfeiffer", ["model.layers.0", "model.layers.1"]),
    ("llama", "houlsby", ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn",
                          "model.layers.1.mlp"]),
])
def test_default_targets_per_architecture(kind, placement, expected):
    model = dt.get_peft_model(make_model(kind), dt.BottleneckConfig(placement=placement, reduction_factor=4))
    assert model.targeted_module_names == expected
    layer = model.get_base_model().get_submodule(expected[0])
    assert layer.adapter_down["default"].weight.shape == (8, 32)  # 32 // 4
    assert layer.kind == ("block" if kind == "bert" else "output")


def test_layers_to_transform_and_bottleneck_size():
    config = dt.BottleneckConfig(placement="houlsby", bottleneck_size=5, layers_to_transform=[1])
    model = dt.get_peft_model(make_model("llama"), config)
    assert model.targeted_module_names == ["model.layers.1.self_attn", "model.layers.1.mlp"]
    assert model.get_base_model().model.layers[1].mlp.adapter_up["default"].weight.shape == (32, 5)


def test_explicit_targets_on_a_model_without_a_layout():
    base = make_model("gpt2")
    inputs = model_inputs("gpt2")
    model = dt.get_peft_model(copy.deepcopy(base), dt.BottleneckConfig(target_modules=["mlp"], bottleneck_size=4))
    assert model.targeted_module_names == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert torch.equal(logits(model, inputs), logits(base, inputs))
    perturb(model, ADAPTER_KEYS)
    assert not torch.allclose(logits(model, inputs), logits(base, inputs), atol=1e-3)


def test_init_modes():
    def up_weight(init: str) -> torch.Tensor:
        model = dt.get_peft_model(make_model("llama"), dt.BottleneckConfig(init_weights=init, bottleneck_size=16))
        return model.get_base_model().model.layers[0].adapter_up["default"].weight

    assert torch.count_nonzero(up_weight("mam_adapter")) == 0
    houlsby = up_weight("houlsby")
    assert houlsby.abs().max() <= 0.02 and torch.count_nonzero(houlsby) == houlsby.numel()
    assert 0.01 < up_weight("bert").std() < 0.03


# ---- the life-cycle contract ---------------------------------------------------------------------------------

TABLE = [
    ("llama-pfeiffer", "llama", lambda: dt.BottleneckConfig(reduction_factor=4)),
    ("llama-houlsby", "llama", lambda: dt.BottleneckConfig(placement="houlsby", bottleneck_size=6, dropout=0.1)),
    ("qwen2-houlsby-tanh", "qwen2", lambda: dt.BottleneckConfig(placement="houlsby", non_linearity="tanh")),
    ("bert-seqcls-pfeiffer", "bert", lambda: dt.BottleneckConfig(reduction_factor=4, task_type="SEQ_CLS")),
    ("bert-houlsby-scaled", "bert", lambda: dt.BottleneckConfig(placement="houlsby", scaling=0.5)),
]


@pytest.fixture(params=TABLE, ids=[row[0] for row in TABLE])
def case(request):
    _, kind, make_config = request.param
    return kind, make_model(kind), make_config


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_output_unchanged_at_init(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = dt.get_peft_model(copy.deepcopy(base), make_config()).eval()
    assert torch.equal(logits(model, inputs), logits(base, inputs))


def test_only_adapter_parameters_train(case):
    kind, base, make_config = case
    model = dt.get_peft_model(copy.deepcopy(base), make_config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(k in n for k in ADAPTER_KEYS) for n in trainable)
    assert {n for n in trainable if "adapter_" in n} == {
        n for n, _ in model.named_parameters() if ".adapter_down." in n or ".adapter_up." in n}
    perturb(model, ADAPTER_KEYS)  # up != 0, so that down gets a gradient too
    model.train()
    model(**model_inputs(kind)).logits.square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable


def test_save_load_round_trip(case, tmp_path):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = dt.get_peft_model(copy.deepcopy(base), make_config()).eval()
    perturb(model, ADAPTER_KEYS)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json", encoding="utf-8") as fh:
        saved = json.load(fh)
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == model.peft_config["default"].placement
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    layers = model.targeted_module_names
    assert {k for k in keys if "modules_to_save" not in k and "classifier" not in k} == {
        f"base_model.model.{name}.{part}.{leaf}" for name in layers for part in ("adapter_down", "adapter_up")
        for leaf in ("weight", "bias")}
    assert isinstance(dt.PeftConfig.from_pretrained(tmp_path), dt.BottleneckConfig)
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_disable_adapter_gives_base_output(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = dt.get_peft_model(copy.deepcopy(base), make_config()).eval()
    perturb(model, ADAPTER_KEYS)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, logits(base, inputs), atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), logits(base, inputs))
    assert torch.equal(logits(model, inputs), adapted)


def test_merge_is_refused_and_changes_nothing(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = dt.get_peft_model(copy.deepcopy(base), make_config()).eval()
    perturb(model, ADAPTER_KEYS)
    expected, state = logits(model, inputs), _state(model)
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged.*non-linearity"):
            call()
        assert torch.equal(logits(model, inputs), expected)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert len(list(adapter_layers(model))) >= len(model.targeted_module_names)
    layer = next(layer for _, layer in adapter_layers(model) if isinstance(layer, BottleneckLayer))
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.unwrapped(merge=True)


def test_unload_gives_the_base_model_back(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    original = copy.deepcopy(base)
    modules = dict(original.named_modules())
    model = dt.get_peft_model(original, make_config()).eval()
    perturb(model, ("adapter_down", "adapter_up"))  # (a trained modules_to_save copy stays after unload, as in PEFT)
    targets = model.targeted_module_names
    unloaded = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in unloaded.modules())
    assert all(unloaded.get_submodule(name) is modules[name] for name in targets)
    assert torch.equal(logits(unloaded, inputs), logits(base, inputs))


# ---- several adapters ----------------------------------------------------------------------------------------

def test_two_adapters_switch_mix_and_delete():
    base = make_model("bert")
    inputs = model_inputs("bert")
    model = dt.get_peft_model(copy.deepcopy(base), dt.BottleneckConfig(placement="houlsby", bottleneck_size=4))
    model.add_adapter("other", dt.BottleneckConfig(placement="pfeiffer", bottleneck_size=3))
    perturb(model, ADAPTER_KEYS)
    model.eval()
    first = logits(model, inputs)
    model.set_adapter("other")
    second = logits(model, inputs)
    assert not torch.allclose(first, second, atol=1e-4)
    mixed = logits(model, inputs, adapter_names=["default", "other", "__base__"])
    assert torch.allclose(mixed[0], first[0], atol=1e-6) and torch.allclose(mixed[1], second[1], atol=1e-6)
    assert torch.allclose(mixed[2], logits(base, inputs)[2], atol=1e-6)
    model.delete_adapter("default")
    assert torch.equal(logits(model, inputs), second)
    assert all(layer.adapter_names() == ["other"] for _, layer in adapter_layers(model))


def test_does_not_wrap_another_methods_layer():
    """At the layer level (whatever PeftModel's rule on mixing methods): wrapping a module that holds a LoRA layer
    would rename the LoRA tensors, so attach refuses, and changes nothing."""
    model = make_model("llama")
    lora.attach(model, dt.LoraConfig(r=2, target_modules=["down_proj"]), "default")
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj is a LoraLayer"):
        bottleneck.attach(model, dt.BottleneckConfig(placement="houlsby"), "bn")
    assert _unchanged(model, before)


# ---- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bottleneck_size": 0}, "bottleneck_size must be a positive integer.*got 0"),
    ({"bottleneck_size": -3}, "got -3"),
    ({"bottleneck_size": 2.5}, "got 2.5"),
    ({"bottleneck_size": True}, "got True"),
    ({"reduction_factor": 0}, "reduction_factor must be > 0.*got 0"),
    ({"reduction_factor": float("nan")}, "reduction_factor must be finite"),
    ({"reduction_factor": "16"}, "reduction_factor must be a number"),
    ({"bottleneck_size": 8, "reduction_factor": 4}, "not both"),
    ({"non_linearity": "softplus"}, "non_linearity='softplus' is not known"),
    ({"placement": "middle"}, "placement must be one of.*'middle'"),
    ({"init_weights": "zeros"}, "init_weights must be one of.*'zeros'"),
    ({"scaling": float("inf")}, "scaling must be finite"),
    ({"dropout": 1.0}, "dropout must be a number in"),
    ({"layers_pattern": "layers"}, "layers_pattern only has a meaning"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dt.BottleneckConfig(**kwargs)


def _unchanged(model: torch.nn.Module, before: torch.nn.Module) -> bool:
    return ([type(m) for m in model.modules()] == [type(m) for m in before.modules()]
            and all(torch.equal(v, before.state_dict()[k]) for k, v in model.state_dict().items()))


@pytest.mark.parametrize(("kind", "config", "message"), [
    ("llama", lambda: dt.BottleneckConfig(reduction_factor=64), r"reduction_factor=64 gives a bottleneck of.*= 0"),
    ("gpt2", lambda: dt.BottleneckConfig(), "no bottleneck adapter layout for model type 'gpt2'"),
    ("llama", lambda: dt.BottleneckConfig(target_modules=["nothing_here"]), "matched no module"),
])
def test_bad_attach_leaves_the_model_unchanged(kind, config, message):
    model = make_model(kind)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=message):
        dt.get_peft_model(model, config())
    assert _unchanged(model, before)


def test_a_field_broken_after_construction_is_caught_at_attach():
    config = dt.BottleneckConfig()
    config.bottleneck_size, config.reduction_factor = 0, None
    model = make_model("llama")
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        dt.get_peft_model(model, config)
    assert _unchanged(model, before)
