"""The registry (methods/__init__.py) is the one place that knows methods: what each entry declares holds.

For every layer-wrapping method: its default targets are the modules it adapts when target_modules is None,
its state-dict markers find exactly those modules again in its own saved tensors (inject_adapter_in_model's
``state_dict=``), and PeftType, the CLI's --method choices and ``merge``'s refusals come from the entries.
"""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from deltatune.methods import METHODS, PeftType, method_for
from deltatune.train.config import method_names
from tests.conftest import logits, make_model, model_inputs

LAYER_CONFIGS = {
    "LORA": lambda: dt.LoraConfig(task_type="CAUSAL_LM"),
    "IA3": lambda: dt.IA3Config(task_type="CAUSAL_LM"),
    "BOTTLENECK": lambda: dt.BottleneckConfig(task_type="CAUSAL_LM"),
}


def test_every_method_is_a_peft_type_and_every_layer_method_is_covered_here():
    assert {t.value for t in PeftType} == set(METHODS)
    assert {name for name, m in METHODS.items() if m.kind == "layers"} == set(LAYER_CONFIGS)
    assert {m.cli.name for m in METHODS.values() if m.cli} == set(method_names())


@pytest.mark.parametrize("peft_type", sorted(LAYER_CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_default_targets_and_markers_find_the_same_modules(peft_type, arch):
    method = method_for(peft_type)
    base = make_model(arch)
    config = LAYER_CONFIGS[peft_type]()
    expected = method.default_targets(base, config)
    assert expected, "a layer method must name default targets for these architectures"
    model = dt.get_peft_model(base, config)
    assert model.peft_config["default"].target_modules == expected
    for p in model.parameters():  # random adapter values, so the reloaded copy can be compared
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    tensors = dt.get_peft_model_state_dict(model)
    assert tensors and all(any(m in key for m in method.state_dict_markers) for key in tensors)

    again = make_model(arch)
    injected = copy.deepcopy(model.peft_config["default"])  # (IA)^3 needs its feed-forward list as saved
    injected.target_modules = None
    dt.inject_adapter_in_model(injected, again, state_dict=tensors)
    assert [n for n, _ in adapter_layers(again)] == [n for n, _ in adapter_layers(model.get_base_model())]
    result = dt.set_peft_model_state_dict(again, {k.removeprefix("base_model.model."): v for k, v in tensors.items()})
    assert not result.unexpected_keys and not result.missing_keys
    inputs = model_inputs(arch)
    assert torch.allclose(logits(again, inputs), logits(model, inputs), atol=1e-6)


def test_markers_of_another_method_find_nothing():
    model = dt.get_peft_model(make_model("llama"), dt.IA3Config(task_type="CAUSAL_LM"))
    tensors = dt.get_peft_model_state_dict(model)
    with pytest.raises(ValueError, match=r"no LORA adapter tensors.*\.lora_"):
        dt.inject_adapter_in_model(dt.LoraConfig(), make_model("llama"), state_dict=tensors)


def test_lora_bias_tensors_come_from_the_method():
    model = dt.get_peft_model(make_model("bert"), dt.LoraConfig(task_type="SEQ_CLS", bias="lora_only"))
    keys = set(dt.get_peft_model_state_dict(model))
    assert {k for k in keys if k.endswith("base_layer.bias")} == {
        f"base_model.model.{n}.base_layer.bias" for n in model.targeted_module_names}
    assert method_for("IA3").base_tensors_in_file is None
