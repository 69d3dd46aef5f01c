"""(IA)^3 (methods/ia3.py): the contract checks, the layer's formulas, and HF PEFT as the oracle.

The contract table runs every row through the same checks as tests/test_contract.py; the interop table
moves adapters both ways between deltatune and PEFT and compares logits and greedy generations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from deltatune.methods.ia3 import IA3Layer
from deltatune.quant import Linear4bit, Linear8bit, quantize_arguments, quantize_model
from tests.conftest import assert_unchanged, logits, make_model, model_inputs, snapshot
from tests.conftest import quiet as _quiet


@torch.no_grad()
def perturb_ia3(model: nn.Module, seed: int = 3) -> None:
    """Vectors near one (as trained ones are), head copies random: the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * 0.3
        if "ia3_l" in name:
            param.copy_(1.0 + noise)
        elif "modules_to_save" in name:
            param.copy_(noise)


# ---- the contract, table-driven -----------------------------------------------------------------

TABLE = [
    ("ia3-llama-default", "llama", lambda: dt.IA3Config()),
    ("ia3-llama-all-linear", "llama", lambda: dt.IA3Config(target_modules="all-linear")),
    ("ia3-gpt2-conv1d", "gpt2", lambda: dt.IA3Config()),
    ("ia3-bert-seqcls", "bert", lambda: dt.IA3Config(task_type=dt.TaskType.SEQ_CLS)),
    ("ia3-t5-default", "t5", lambda: dt.IA3Config()),
]


@pytest.fixture(params=TABLE, ids=[row[0] for row in TABLE])
def case(request):
    _, kind, make_config = request.param
    return kind, make_model(kind), make_config


def test_output_unchanged_at_init(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = _quiet(dt.get_peft_model, copy.deepcopy(base), make_config()).eval()
    assert torch.equal(logits(model, inputs), logits(base, inputs))  # x * 1.0 is exact
    vectors = [p for n, p in model.named_parameters() if "ia3_l" in n]
    assert vectors and all(torch.equal(v, torch.ones_like(v)) for v in vectors)


def test_only_adapter_parameters_train(case):
    kind, base, make_config = case
    model = _quiet(dt.get_peft_model, copy.deepcopy(base), make_config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ia3_l." in n or ".modules_to_save." in n for n in trainable)
    assert any(".modules_to_save." in n for n in trainable) == (kind == "bert")  # the SEQ_CLS head
    perturb_ia3(model)
    model.train()
    model(**model_inputs(kind)).logits.square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable


def test_merged_equals_unmerged_and_unmerge_restores(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = _quiet(dt.get_peft_model, copy.deepcopy(base), make_config()).eval()
    perturb_ia3(model)
    expected = logits(model, inputs)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in adapter_layers(model)
               if isinstance(layer, IA3Layer)}
    model.merge_adapter()
    assert all(not torch.equal(layer.base_layer.weight, weights[n]) for n, layer in adapter_layers(model)
               if n in weights)  # really folded in
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5)
    model.unmerge_adapter()
    for name, layer in adapter_layers(model):
        if name in weights:
            assert torch.allclose(layer.base_layer.weight, weights[name], atol=1e-6, rtol=1e-6), name
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5)
    merged = model.merge_and_unload()
    assert not list(adapter_layers(merged))
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5)


def test_save_load_round_trip(case, tmp_path):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = _quiet(dt.get_peft_model, copy.deepcopy(base), make_config()).eval()
    perturb_ia3(model)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(loaded.peft_config["default"], dt.IA3Config)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_disable_adapter_gives_base_output(case):
    kind, base, make_config = case
    inputs = model_inputs(kind)
    model = _quiet(dt.get_peft_model, copy.deepcopy(base), make_config()).eval()
    perturb_ia3(model)
    adapted = logits(model, inputs)
    assert (adapted - logits(base, inputs)).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), logits(base, inputs))
    assert torch.equal(logits(model, inputs), adapted)


# ---- PEFT as the oracle -------------------------------------------------------------------------

CASES = [
    # (model kind, config kwargs shared by both libraries)
    ("llama", {}),
    ("llama", {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
               "feedforward_modules": ["up_proj", "down_proj"],
               "exclude_modules": ["model.layers.0.self_attn.q_proj"]}),
    ("gpt2", {}),
    ("gpt2", {"target_modules": r".*\.(c_attn|c_fc)", "feedforward_modules": r".*\.c_fc", "fan_in_fan_out": True}),
    ("bert", {"task_type": "SEQ_CLS"}),
    ("t5", {"task_type": "SEQ_2_SEQ_LM"}),
]
IDS = [f"{kind}-{i}" for i, (kind, _) in enumerate(CASES)]
GENERATES = ("llama", "gpt2")


def _generate(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=model_inputs(kind)["input_ids"], max_new_tokens=5, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize(("kind", "kwargs"), CASES, ids=IDS)
def test_peft_adapter_loads_in_deltatune_with_same_outputs(kind, kwargs, tmp_path):
    base = make_model(kind)
    inputs = model_inputs(kind)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config(**copy.deepcopy(kwargs))).eval()
    perturb_ia3(theirs)
    expected = logits(theirs, inputs)
    assert (expected - logits(base, inputs)).abs().max() > 1e-3
    _quiet(theirs.save_pretrained, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PEFT file must load without complaint
        ours = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (logits(ours, inputs) - expected).abs().max() <= 1e-6
    if kind in GENERATES:
        assert torch.equal(_generate(ours, kind), _quiet(_generate, theirs, kind))


@pytest.mark.parametrize(("kind", "kwargs"), CASES, ids=IDS)
def test_deltatune_adapter_loads_in_peft_with_same_outputs(kind, kwargs, tmp_path):
    base = make_model(kind)
    inputs = model_inputs(kind)
    ours = _quiet(dt.get_peft_model, copy.deepcopy(base), dt.IA3Config(**copy.deepcopy(kwargs))).eval()
    perturb_ia3(ours)
    expected = logits(ours, inputs)
    assert (expected - logits(base, inputs)).abs().max() > 1e-3
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
    assert (logits(theirs, inputs) - expected).abs().max() <= 1e-6
    if kind in GENERATES:
        assert torch.equal(_quiet(_generate, theirs, kind), _generate(ours, kind))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert", "t5"])
def test_default_targets_feedforward_flags_and_counts_match_peft(kind, tmp_path):
    base = make_model(kind)
    task = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    ours = _quiet(dt.get_peft_model, copy.deepcopy(base), dt.IA3Config(**task))
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config(**task))
    their_layers = {n.removeprefix("base_model.model."): m.is_feedforward for n, m in theirs.named_modules()
                    if isinstance(m, peft.tuners.ia3.IA3Layer)}
    our_layers = {n: layer.is_feedforward["default"] for n, layer in adapter_layers(ours.get_base_model())
                  if isinstance(layer, IA3Layer)}
    assert our_layers == their_layers and any(our_layers.values()) and not all(our_layers.values())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # the file: PEFT's tensor names and shapes, PEFT's config keys, the defaults written out
    ours.save_pretrained(tmp_path / "dt")
    _quiet(theirs.save_pretrained, tmp_path / "peft")
    our_file, their_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("dt", "peft"))
    assert {k: v.shape for k, v in our_file.items()} == {k: v.shape for k, v in their_file.items()}
    assert all(key.endswith(".ia3_l") or ".classifier." in key for key in our_file)
    our_config, their_config = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("dt", "peft"))
    assert set(our_config) <= {f.name for f in dataclasses.fields(peft.IA3Config)} | {"auto_mapping"}
    assert our_config["peft_type"] == "IA3" and our_config["inference_mode"] is True
    for key in ("target_modules", "feedforward_modules"):
        assert sorted(our_config[key]) == sorted(their_config[key])


def test_all_linear_wraps_what_peft_wraps_and_its_file_loads_in_peft(tmp_path):
    """PEFT writes all-linear out as full names next to feedforward ['down_proj'], a file it cannot read back;
    deltatune keeps "all-linear", which both libraries read."""
    base = make_model("llama")
    inputs = model_inputs("llama")
    ours = dt.get_peft_model(copy.deepcopy(base), dt.IA3Config(target_modules="all-linear")).eval()
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config(target_modules="all-linear"))
    assert sorted(ours.targeted_module_names) == sorted(theirs.peft_config["default"].target_modules)
    perturb_ia3(ours)
    ours.save_pretrained(tmp_path / "dt")
    assert json.loads((tmp_path / "dt" / "adapter_config.json").read_text())["target_modules"] == "all-linear"
    loaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "dt").eval()
    assert (logits(loaded, inputs) - logits(ours, inputs)).abs().max() <= 1e-6
    _quiet(theirs.save_pretrained, tmp_path / "peft")
    with pytest.raises(ValueError, match="subset"):
        _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "peft")
    with pytest.raises(ValueError, match=r"feedforward_modules=\['down_proj'\] must be a subset"):
        dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")


def test_default_feedforward_is_cut_to_the_targets_so_the_file_loads_in_peft(tmp_path):
    """PEFT fills feedforward_modules=['down_proj'] next to target_modules=['k_proj', 'v_proj'] and then refuses
    its own file; deltatune writes [] (same modules marked: none) and both libraries read it."""
    base = make_model("llama")
    inputs = model_inputs("llama")
    ours = dt.get_peft_model(copy.deepcopy(base), dt.IA3Config(target_modules=["k_proj", "v_proj"])).eval()
    assert ours.peft_config["default"].feedforward_modules == []
    perturb_ia3(ours)
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
    assert (logits(theirs, inputs) - logits(ours, inputs)).abs().max() <= 1e-6


def test_conv2d_and_grouped_conv_match_peft_and_merge():
    """A custom model (no model_type): Conv2d with groups, input and output vectors, the same outputs as PEFT."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 6, 3, groups=2, padding=1)
            self.b = nn.Conv2d(6, 4, 1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 4, 5, 5)
    for feedforward in (["a", "b"], ["fc"]):
        kwargs = {"target_modules": ["a", "b", "fc"], "feedforward_modules": feedforward}
        theirs = _quiet(peft.get_peft_model, copy.deepcopy(net), peft.IA3Config(**kwargs))
        perturb_ia3(theirs)
        ours = dt.get_peft_model(copy.deepcopy(net), dt.IA3Config(**kwargs))
        dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
        with torch.no_grad():
            expected = theirs(x)
            assert (ours(x) - expected).abs().max() <= 1e-6
            ours.merge_adapter()
            assert (ours(x) - expected).abs().max() <= 1e-5
            ours.unmerge_adapter()
            assert (ours.merge_and_unload()(x) - expected).abs().max() <= 1e-5


def test_peft_refuses_to_mix_methods_and_so_does_deltatune():
    base = make_model("llama")
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(r=2))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        theirs.add_adapter("ia3", peft.IA3Config())
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=2))
    before = snapshot(ours)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        ours.add_adapter("ia3", dt.IA3Config())
    assert_unchanged(ours, before)
    assert list(ours.peft_config) == ["default"]


def test_lora_cannot_join_an_ia3_model():
    ours = dt.get_peft_model(make_model("llama"), dt.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        ours.add_adapter("lora", dt.LoraConfig(r=2, target_modules=["q_proj"]))


# ---- the layer ----------------------------------------------------------------------------------


def test_linear_output_vector_scales_rows_and_input_vector_scales_columns():
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    out_layer, in_layer = IA3Layer(copy.deepcopy(base)), IA3Layer(copy.deepcopy(base))
    out_layer.add_adapter("a", is_feedforward=False, init_ia3_weights=False)
    in_layer.add_adapter("a", is_feedforward=True, init_ia3_weights=False)
    for layer in (out_layer, in_layer):
        layer.active_adapters = ["a"]
    l_out, l_in = out_layer.ia3_l["a"], in_layer.ia3_l["a"]
    assert l_out.shape == (3, 1) and l_in.shape == (1, 5)
    with torch.no_grad():
        assert torch.allclose(out_layer(x), l_out.flatten() * (x @ base.weight.T + base.bias), atol=1e-6)
        assert torch.allclose(in_layer(x), (l_in.flatten() * x) @ base.weight.T + base.bias, atol=1e-6)
        out_layer.merge()
        in_layer.merge()
        assert torch.allclose(out_layer.base_layer.weight, l_out * base.weight)  # rows
        assert torch.allclose(out_layer.base_layer.bias, l_out.flatten() * base.bias)
        assert torch.allclose(in_layer.base_layer.weight, base.weight * l_in)  # columns
        assert torch.equal(in_layer.base_layer.bias, base.bias)  # an input vector leaves the bias alone


def test_gpt2_conv1d_uses_the_transposed_weight():
    model = make_model("gpt2")
    conv = model.transformer.h[0].mlp.c_proj  # weight (in=128, out=32)
    for feedforward in (True, False):
        layer = IA3Layer(copy.deepcopy(conv), fan_in_fan_out=True)
        layer.add_adapter("a", is_feedforward=feedforward, init_ia3_weights=False)
        layer.active_adapters = ["a"]
        x = torch.randn(2, 3, 128)
        with torch.no_grad():
            expected = layer(x)
            layer.merge()
            assert torch.allclose(layer(x), expected, atol=1e-5)


def test_active_adapters_multiply_and_mixed_batches_pick_one_per_row():
    torch.manual_seed(0)
    layer = IA3Layer(nn.Linear(4, 3))
    layer.add_adapter("a", is_feedforward=False, init_ia3_weights=False)
    layer.add_adapter("b", is_feedforward=True, init_ia3_weights=False)
    x = torch.randn(3, 2, 4)
    base = layer.base_layer
    with torch.no_grad():
        layer.active_adapters = ["a", "b"]
        both = layer(x)
        assert torch.allclose(both, layer.ia3_l["a"].flatten() * base(layer.ia3_l["b"].flatten() * x), atol=1e-6)
        singles = []
        for name in ("a", "b"):
            layer.active_adapters = [name]
            singles.append(layer(x))
        layer.batch_adapter_names = ["b", "__base__", "a"]
        mixed = layer(x)
    assert torch.allclose(mixed[0], singles[1][0], atol=1e-6)
    assert torch.equal(mixed[1], base(x)[1])
    assert torch.allclose(mixed[2], singles[0][2], atol=1e-6)


def test_mixed_batch_through_the_model_and_generate():
    base = make_model("llama")
    inputs = model_inputs("llama")
    model = dt.get_peft_model(copy.deepcopy(base), dt.IA3Config()).eval()
    model.add_adapter("other", dt.IA3Config())
    perturb_ia3(model)
    per_adapter = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per_adapter[name] = logits(model, inputs)
    mixed = logits(model, inputs, adapter_names=["other", "__base__", "default"])
    assert torch.allclose(mixed[0], per_adapter["other"][0], atol=1e-5)
    assert torch.allclose(mixed[1], logits(base, inputs)[1], atol=1e-5)
    assert torch.allclose(mixed[2], per_adapter["default"][2], atol=1e-5)
    ids = inputs["input_ids"][:2]
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, adapter_names=["other", "default"])
        model.set_adapter("other")
        alone = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(tokens[:1], alone)


def test_unmerge_restores_entries_a_zero_vector_wiped_out():
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = IA3Layer(base)
    layer.add_adapter("a", is_feedforward=False, init_ia3_weights=False)
    layer.active_adapters = ["a"]
    with torch.no_grad():
        layer.ia3_l["a"][1] = 0.0
        layer.merge()
        assert torch.equal(base.weight[1], torch.zeros(4)) and base.bias[1] == 0
        layer.unmerge()
    assert torch.allclose(base.weight, weight, atol=1e-6) and torch.equal(base.weight[1], weight[1])
    assert torch.allclose(base.bias, bias, atol=1e-6) and torch.equal(base.bias[1], bias[1])


def test_safe_merge_refuses_inf_and_leaves_every_weight():
    model = dt.get_peft_model(make_model("llama"), dt.IA3Config())
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.ia3_l["default"][0, 0] = float("inf")
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in adapter_layers(model)}
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    for name, layer in adapter_layers(model):
        assert torch.equal(layer.base_layer.weight, before[name]) and not layer.merged_adapters


def test_bf16_base_keeps_vectors_in_fp32_and_the_output_dtype():
    layer = IA3Layer(nn.Linear(4, 3).to(torch.bfloat16))
    layer.add_adapter("a", is_feedforward=True)
    layer.add_adapter("b", is_feedforward=False)
    layer.active_adapters = ["a", "b"]
    assert layer.ia3_l["a"].dtype == torch.float32
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_quantized_base_runs_unmerged_and_merge_and_unload_gives_float_linear(name):
    base = make_model("llama")
    quantize_model(base, **quantize_arguments(name))
    inputs = model_inputs("llama")
    model = dt.get_peft_model(copy.deepcopy(base), dt.IA3Config()).eval()
    layers = [layer for _, layer in adapter_layers(model)]
    assert len(layers) == 6 and all(isinstance(layer.base_layer, (Linear4bit, Linear8bit)) for layer in layers)
    assert torch.equal(logits(model, inputs), logits(base, inputs))
    perturb_ia3(model)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in model.named_parameters() if "ia3_l" in n}
    model.eval()
    expected = logits(model, inputs)
    before = snapshot(model)
    with pytest.raises(ValueError, match="quantized.*merge_and_unload"):
        model.merge_adapter()
    assert_unchanged(model, before)
    merged = model.merge_and_unload()
    adapted = [m for n, m in merged.named_modules() if n.endswith(("k_proj", "v_proj", "down_proj"))]
    assert len(adapted) == 6 and all(type(m) is nn.Linear for m in adapted)
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------


def test_defaults_and_fields_match_peft():
    ours = {f.name: f for f in dataclasses.fields(dt.IA3Config)}
    for field in dataclasses.fields(peft.IA3Config):
        assert field.name in ours, field.name
        if field.name != "peft_type":
            assert ours[field.name].default == field.default, field.name
    assert dt.IA3Config().peft_type == "IA3" == dt.PeftType.IA3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, r"must be a subset.*\['down_proj'\]"),
    ({"init_ia3_weights": "yes"}, "init_ia3_weights must be True or False"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out must be True or False"),
    ({"feedforward_modules": 3}, "feedforward_modules=3 must be a list"),
    ({"target_modules": "(unclosed"}, "not a valid regular expression"),
])
def test_config_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dt.IA3Config(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target_modules": ["nothing_here"], "feedforward_modules": []}, "matched no module"),
    ({"feedforward_modules": ["up_proj"]}, r"must be a subset.*\['up_proj'\]"),  # after the default targets
    ({"target_modules": ["embed_tokens", "k_proj"], "feedforward_modules": []}, "cannot wrap a Embedding"),
    ({"target_modules": ["mlp.down_proj"]}, "feedforward_modules was not given"),
])
def test_bad_targets_leave_the_model_unchanged(kwargs, match):
    model = make_model("llama")
    before = snapshot(model)
    config = dt.IA3Config(**kwargs)
    with pytest.raises(ValueError, match=match):
        dt.get_peft_model(model, config)
    assert_unchanged(model, before)
    assert config.target_modules == kwargs.get("target_modules") and config.feedforward_modules == kwargs.get(
        "feedforward_modules")


def test_a_model_without_defaults_needs_targets_and_feedforward_modules():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="target_modules was not given"):
        dt.get_peft_model(copy.deepcopy(net), dt.IA3Config())
    with pytest.raises(ValueError, match="feedforward_modules was not given"):
        dt.get_peft_model(copy.deepcopy(net), dt.IA3Config(target_modules=["0"]))
    model = dt.get_peft_model(copy.deepcopy(net), dt.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    assert {n: layer.is_feedforward["default"] for n, layer in adapter_layers(model.get_base_model())} == {
        "0": False, "2": True}


def test_second_adapter_with_the_same_name_is_refused_and_changes_nothing():
    model = dt.get_peft_model(make_model("llama"), dt.IA3Config())
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter named"):
        dt.inject_adapter_in_model(dt.IA3Config(), model.get_base_model(), "default")
    assert_unchanged(model, before)
