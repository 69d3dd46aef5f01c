"""Issue #10, the library side: nothing silently wrong, and a failed call leaves the model exactly as it was.

``snapshot(model)`` records everything a failure could disturb (values, requires_grad, training flags, the very
module objects at their names, the adapter configs and the active adapters); each error path of
``from_pretrained``, ``load_adapter``, ``add_adapter``, ``get_peft_model``, ``inject_adapter_in_model`` and the
merges is run against it. Non-finite values are refused where they would be written or quantized, and named
where they are loaded; adapter names and adapter files cannot reach outside their place.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.quant import load_quantized, quantize_fp4, quantize_int8, quantize_model, quantize_nf4
from deltatune.quant.gguf import load_gguf_quantized
from tests.conftest import make_model, perturb

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


# ---- the snapshot --------------------------------------------------------------------------------------------------

@dataclass
class Snapshot:
    """What a failed call must leave as it was."""

    values: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    modules: dict[str, nn.Module]
    training: dict[str, bool]
    configs: dict[str, tuple[int, dict[str, Any]]]
    active: list[str] | None


def snapshot(model: nn.Module) -> Snapshot:
    """Values (parameters and buffers), requires_grad, module objects by name, training flags, configs, active."""
    configs = getattr(model, "peft_config", None)
    configs = configs if isinstance(configs, dict) else {}
    return Snapshot(
        values={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        modules=dict(model.named_modules(remove_duplicate=False)),
        training={n: m.training for n, m in model.named_modules(remove_duplicate=False)},
        configs={name: (id(c), copy.deepcopy(vars(c))) for name, c in configs.items()},
        active=list(model.active_adapters) if isinstance(model, dt.PeftModel) else None,
    )


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape, device and values, NaN equal to NaN."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def assert_unchanged(model: nn.Module, before: Snapshot, allow_values: tuple[str, ...] = ()) -> None:
    """``model`` is as ``before`` recorded it (``allow_values``: state-dict keys whose values may differ)."""
    after = snapshot(model)
    assert after.modules.keys() == before.modules.keys(), sorted(set(after.modules) ^ set(before.modules))[:10]
    moved = [n for n in before.modules if after.modules[n] is not before.modules[n]]
    assert not moved, f"other module objects at {moved[:10]}"
    assert after.values.keys() == before.values.keys(), sorted(set(after.values) ^ set(before.values))[:10]
    changed = [k for k in before.values if k not in allow_values and not same_values(after.values[k], before.values[k])]
    assert not changed, f"values changed: {changed[:10]}"
    assert after.requires_grad == before.requires_grad, [
        n for n in before.requires_grad if after.requires_grad[n] != before.requires_grad[n]][:10]
    assert after.training == before.training
    assert after.configs.keys() == before.configs.keys()
    for name, (ident, fields) in before.configs.items():
        assert after.configs[name][0] == ident and after.configs[name][1] == fields, name
    assert after.active == before.active


def user_model() -> nn.Module:
    """A tiny Llama whose user froze some parameters and left others trainable (a failure must restore both)."""
    model = make_model("llama")
    for i, param in enumerate(model.parameters()):
        param.requires_grad_(i % 3 == 0)
    return model


def wrapped_model() -> dt.PeftModel:
    """A PeftModel with one adapter, a modules_to_save copy, and a base parameter the user unfroze."""
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"],
                                                                modules_to_save=["lm_head"]))
    perturb(model)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    return model


@pytest.fixture
def saved(tmp_path) -> Path:
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))  # allow_nan: a hand-made file may hold bare NaN


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


# ---- every error path leaves the model as it was ------------------------------------------------------------------

# name -> (change to the saved folder, keyword arguments, error, message)
LOAD_FAILURES: dict[str, tuple[Callable[[Path], None], dict[str, Any], type[Exception], str]] = {
    "missing folder": (lambda d: shutil.rmtree(d), {}, FileNotFoundError, "does not exist"),
    "invalid JSON": (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA",,}'), {}, ValueError,
                     "not valid JSON"),
    "JSON list": (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), {}, ValueError, "JSON object"),
    "unknown peft_type": (lambda d: edit_config(d, peft_type="SUPER_LORA"), {}, ValueError, "SUPER_LORA"),
    "unhashable peft_type": (lambda d: edit_config(d, peft_type=["LORA"]), {}, ValueError, "not a method"),
    "shape mismatch": (lambda d: edit_tensors(d, lambda t: t.update({KEY_A: torch.zeros(4, 31)})), {}, ValueError,
                       r"file has \(4, 31\)"),
    "rank mismatch": (lambda d: edit_config(d, r=8), {}, ValueError, r"model has \(8, 32\)"),
    "integer tensor": (lambda d: edit_tensors(d, lambda t: t.update({KEY_A: t[KEY_A].to(torch.int32)})), {},
                       ValueError, "dtype torch.int32"),
    "unsupported field": (lambda d: edit_config(d, use_qalora=True), {}, ValueError, "use_qalora"),
    "alpha as a string": (lambda d: edit_config(d, lora_alpha="16"), {}, ValueError, "lora_alpha must be a number"),
    "alpha NaN": (lambda d: edit_config(d, lora_alpha=math.nan), {}, ValueError, "lora_alpha must be finite"),
    "integer target_modules": (lambda d: edit_config(d, target_modules=3), {}, ValueError, "target_modules=3"),
    "targets nothing": (lambda d: edit_config(d, target_modules=["nope"]), {}, ValueError, "matched no module"),
    "rank too large to allocate": (lambda d: edit_config(d, r=2**40), {}, ValueError, "Could not allocate"),
    "allocation fails on a later layer": (
        lambda d: edit_config(d, rank_pattern={"layers.1.self_attn.v_proj": 2**40}), {}, ValueError,
        r"layers\.1\.self_attn\.v_proj: Could not allocate a rank-1099511627776"),
    "truncated weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:100]), {}, ValueError, "not a readable safetensors"),
    "missing weights": (lambda d: (d / "adapter_model.safetensors").unlink(), {}, FileNotFoundError,
                        "adapter_model.safetensors"),
    "revision": (lambda d: None, {"revision": "x"}, ValueError, "revision='x'"),
    "unknown keyword": (lambda d: None, {"bogus": 1}, TypeError, "bogus"),
    "device that does not exist": (lambda d: None, {"torch_device": "cuda:99"}, ValueError, "torch_device='cuda:99'"),
    "device that is no device": (lambda d: None, {"torch_device": "nonsense"}, ValueError, "torch_device='nonsense'"),
    "bad key_mapping regex": (lambda d: None, {"key_mapping": {"(": "x"}}, ValueError, "key_mapping"),
    "ephemeral_gpu_offload": (lambda d: None, {"ephemeral_gpu_offload": True}, ValueError, "ephemeral_gpu_offload"),
}


@pytest.mark.parametrize("case", sorted(LOAD_FAILURES))
def test_failed_from_pretrained_leaves_model_as_it_was(case, saved):
    change, kwargs, error, message = LOAD_FAILURES[case]
    change(saved)
    model = user_model()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message):
            dt.PeftModel.from_pretrained(model, saved, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", sorted(LOAD_FAILURES))
def test_failed_load_adapter_leaves_model_as_it_was(case, saved):
    change, kwargs, error, message = LOAD_FAILURES[case]
    change(saved)
    model = wrapped_model()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message):
            model.load_adapter(saved, adapter_name="second", **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["a.b", "", "../up", "/absolute", "back\\slash", "__base__", "nul\0", 3])
def test_invalid_adapter_names_are_refused_before_anything(name, saved):
    model = user_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter"):
        dt.PeftModel.from_pretrained(model, saved, adapter_name=name)
    assert_unchanged(model, before)
    wrapped = wrapped_model()
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match="adapter"):
        wrapped.load_adapter(saved, adapter_name=name)
    with pytest.raises(ValueError, match="adapter"):
        wrapped.add_adapter(name, dt.LoraConfig(r=2, target_modules=["v_proj"]))
    assert_unchanged(wrapped, before)


def test_load_into_existing_name_with_other_shapes_leaves_model_as_it_was(saved):
    model = wrapped_model()  # its "default" has r=2 on q_proj; the file has r=4 on q_proj and v_proj
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"file has \(4, 32\), model has \(2, 32\)"):
        model.load_adapter(saved, adapter_name="default")
    assert_unchanged(model, before)


class _PromptLearningConfig(dt.LoraConfig):
    @property
    def is_prompt_learning(self) -> bool:
        return True


def _nan_later() -> dt.LoraConfig:
    config = dt.LoraConfig(r=2, target_modules=["v_proj"])
    config.lora_alpha = math.nan  # after construction: checked again when attached
    return config


ADD_FAILURES: dict[str, tuple[str, Callable[[], Any], type[Exception], str]] = {
    "target matches nothing": ("b", lambda: dt.LoraConfig(target_modules=["nope"]), ValueError, "matched no module"),
    "duplicate name": ("default", lambda: dt.LoraConfig(target_modules=["v_proj"]), ValueError, "exists already"),
    "modules_to_save not found": ("b", lambda: dt.LoraConfig(target_modules=["v_proj"], modules_to_save=["nope"]),
                                  ValueError, "modules_to_save"),
    "allocation fails on a later layer": (
        "b", lambda: dt.LoraConfig(r=2, target_modules=["v_proj"], rank_pattern={"layers.1.self_attn.v_proj": 2**40}),
        ValueError, "Could not allocate"),
    "prompt learning next to LoRA": ("b", lambda: _PromptLearningConfig(target_modules=["v_proj"]), ValueError,
                                     "Prompt-learning"),
    "alpha set to NaN after construction": ("b", _nan_later, ValueError, "lora_alpha must be finite"),
    "not a config": ("b", lambda: {"r": 2}, TypeError, "peft_config must be a config"),
}


@pytest.mark.parametrize("case", sorted(ADD_FAILURES))
def test_failed_add_adapter_leaves_model_as_it_was(case):
    name, config, error, message = ADD_FAILURES[case]
    model = wrapped_model()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        model.add_adapter(name, config())
    assert_unchanged(model, before)


def test_add_adapter_keeps_base_parameters_the_user_unfroze():
    model = wrapped_model()
    norm = model.base_model.model.model.norm.weight
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    model.set_adapter("b")
    assert norm.requires_grad


def test_get_peft_model_refusals_leave_model_as_it_was():
    wrapped = wrapped_model()
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match="already a PeftModel"):
        dt.get_peft_model(wrapped, dt.LoraConfig(r=2))
    with pytest.raises(ValueError, match="already holds adapter layers"):
        dt.get_peft_model(wrapped.get_base_model(), dt.LoraConfig(r=2))
    assert_unchanged(wrapped, before)
    plain = user_model()
    before = snapshot(plain)
    with pytest.raises(ValueError, match="Could not allocate"):
        dt.get_peft_model(plain, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                               rank_pattern={"layers.1.self_attn.v_proj": 2**40}))
    assert_unchanged(plain, before)


def test_rank_too_large_to_allocate_is_a_clear_error():
    model = user_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: Could not allocate a rank-"
                                         r"1099511627776 LoRA adapter for a Linear \(32 -> 32\).*smaller r"):
        dt.get_peft_model(model, dt.LoraConfig(r=2**40, target_modules=["q_proj"]))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="too large"):
        dt.LoraConfig(r=10**30)


def test_failed_inject_adapter_in_model_leaves_model_as_it_was():
    model = user_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        dt.inject_adapter_in_model(dt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["nope"]), model)
    with pytest.raises(ValueError, match="cannot name an adapter"):
        dt.inject_adapter_in_model(dt.LoraConfig(r=2, target_modules=["q_proj"]), model, adapter_name="a.b")
    assert_unchanged(model, before)


def test_failed_set_peft_model_state_dict_leaves_model_as_it_was():
    model = wrapped_model()
    before = snapshot(model)
    state = dt.get_peft_model_state_dict(model)
    state[KEY_A] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"file has \(3, 3\)"):
        dt.set_peft_model_state_dict(model, state)
    assert_unchanged(model, before)


def test_refused_safe_merge_leaves_model_as_it_was():
    model = wrapped_model()
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight[0, 0] = math.nan
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)


class _GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_grouped_conv_refusals_leave_model_as_it_was():
    plain = _GroupedConv()
    before = snapshot(plain)
    with pytest.raises(ValueError, match="divisible by 4"):
        dt.get_peft_model(plain, dt.LoraConfig(r=3, target_modules=["conv"]))
    assert_unchanged(plain, before)
    model = dt.get_peft_model(_GroupedConv(), dt.LoraConfig(r=4, target_modules=["conv"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.add_adapter("b", dt.LoraConfig(r=6, target_modules=["conv"]))
    with pytest.raises(ValueError, match="groups=4"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="groups=4"):
        model.merge_and_unload()
    assert_unchanged(model, before)


# ---- non-finite values ---------------------------------------------------------------------------------------------

CONFIG_REFUSALS = {
    "lora_alpha NaN": ({"lora_alpha": math.nan}, "lora_alpha must be finite"),
    "lora_alpha inf": ({"lora_alpha": math.inf}, "lora_alpha must be finite"),
    "lora_alpha string": ({"lora_alpha": "16"}, "lora_alpha must be a number, got '16' .str.; pass e.g."),
    "lora_alpha bool": ({"lora_alpha": True}, "lora_alpha must be a number"),
    "lora_dropout NaN": ({"lora_dropout": math.nan}, "lora_dropout"),
    "lora_dropout string": ({"lora_dropout": "0.1"}, "lora_dropout"),
    "r float": ({"r": 2.5}, "r must be a positive integer"),
    "r string": ({"r": "8"}, "r must be a positive integer"),
    "r NaN": ({"r": math.nan}, "r must be a positive integer"),
    "r beyond any tensor": ({"r": 2**64}, "too large"),
    "target_modules int": ({"target_modules": 3}, "target_modules=3 must be a list of module names"),
    "target_modules with an int": ({"target_modules": ["q_proj", 3]}, "target_modules"),
    "target_modules bad regex": ({"target_modules": "(["}, "not a valid regular expression"),
    "exclude_modules int": ({"exclude_modules": 1}, "exclude_modules"),
    "rank_pattern NaN": ({"rank_pattern": {"q_proj": math.nan}}, r"rank_pattern\['q_proj'\]"),
    "rank_pattern bad regex": ({"rank_pattern": {"(": 4}}, "rank_pattern key"),
    "alpha_pattern inf": ({"alpha_pattern": {"q_proj": math.inf}}, r"alpha_pattern\['q_proj'\] must be finite"),
    "alpha_pattern string": ({"alpha_pattern": {"q_proj": "8"}}, r"alpha_pattern\['q_proj'\] must be a number"),
    "alpha_pattern not a dict": ({"alpha_pattern": [1]}, "alpha_pattern must be a dict"),
    "modules_to_save string": ({"modules_to_save": "lm_head"}, "modules_to_save='lm_head' must be a list"),
    "layers_to_transform string": ({"target_modules": ["q_proj"], "layers_to_transform": "0"}, "layers_to_transform"),
    "task_type list": ({"task_type": []}, "task_type"),
    "use_rslora string": ({"use_rslora": "yes"}, "use_rslora must be True or False"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_REFUSALS))
def test_config_refuses_bad_values_naming_the_field(case):
    kwargs, message = CONFIG_REFUSALS[case]
    with pytest.raises(ValueError, match=message):
        dt.LoraConfig(**kwargs)


def test_config_file_with_bad_values_names_file_and_field(tmp_path):
    dt.LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    edit_config(tmp_path, lora_alpha=math.inf)
    with pytest.raises(ValueError, match=r"adapter_config\.json: lora_alpha must be finite"):
        dt.LoraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value", [("lora_alpha", math.nan), ("alpha_pattern", {"q_proj": math.inf}),
                                         ("loftq_config", {"scale": math.nan})])
def test_config_with_non_finite_value_is_never_written(tmp_path, field, value):
    config = dt.LoraConfig(r=4, target_modules=["q_proj"])
    setattr(config, field, value)  # after construction, past __post_init__
    with pytest.raises(ValueError, match=f"non-finite.*{field}"):
        config.to_dict()
    with pytest.raises(ValueError, match=field):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_adapter_with_non_finite_values_is_never_written(tmp_path):
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["other"].weight[1, 0] = math.inf
    with pytest.raises(ValueError, match=r"NaN or Inf.*so the adapter is not written.*q_proj\.lora_B\.weight"):
        model.save_pretrained(tmp_path)  # the good "default" is checked with it and not written either
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    assert not [p for p in tmp_path.rglob("*.tmp")]


def _nan_adapter(saved: Path) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[KEY_B][0, 0] = math.nan
        tensors[KEY_A][1, 1] = math.inf

    edit_tensors(saved, poison)


def test_loading_non_finite_adapter_warns_naming_the_tensors(saved):
    _nan_adapter(saved)
    message = rf"{saved}: these adapter tensors hold NaN or Inf.*{KEY_A}.*{KEY_B}"
    with pytest.warns(UserWarning, match=message):
        dt.PeftModel.from_pretrained(make_model("llama"), saved)
    model = wrapped_model()
    with pytest.warns(UserWarning, match=message):
        model.load_adapter(saved, adapter_name="second")
    state = load_file(saved / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        dt.set_peft_model_state_dict(model, state, adapter_name="second")


# ---- quantizing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("quantize", [quantize_nf4, quantize_fp4, quantize_int8,
                                      lambda w: quantize_nf4(w, double_quant=False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_non_finite_weight_raises(quantize, bad, dtype):
    weight = torch.randn(8, 70).to(dtype)  # 560 values: a short last block for the 4-bit formats
    weight[3, 69] = bad
    with pytest.raises(ValueError, match=r"1 of its values are NaN or Inf \(the first at index \(3, 69\)\)"):
        quantize(weight)


def test_quantize_model_names_the_layer_and_changes_nothing():
    model = user_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.nan
    before = snapshot(model)
    for bits in (4, 8):
        with pytest.raises(ValueError, match=r"\['model\.layers\.1\.mlp\.up_proj'\] hold NaN or Inf"):
            quantize_model(model, bits=bits)
        assert_unchanged(model, before)


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight"])
def test_streaming_loader_names_a_non_finite_tensor(tmp_path, key):
    model = make_model("llama")
    with torch.no_grad():
        model.get_parameter(key).view(-1)[5] = math.nan
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"{key}: .*NaN or Inf"):
        load_quantized(tmp_path)


def _tiny_gguf(path: Path) -> int:
    """A small but real GGUF file; returns where its tensor data starts (everything before is the header)."""
    from gguf import GGUFReader, GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.add_token_list([f"token{i}" for i in range(50)])
    writer.add_tensor("token_embd.weight", np.ones((50, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return int(GGUFReader(path).tensors[0].data_offset)


def test_gguf_cut_inside_its_header_is_one_clear_error(tmp_path):
    whole = tmp_path / "whole.gguf"
    header = _tiny_gguf(whole)
    data = whole.read_bytes()
    for cut in (0, 3, 8, 20, header // 3, header // 2, header - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"^{path}: not a readable GGUF file .*cut short") as info:
            load_gguf_quantized(path)
        assert "\n" not in str(info.value)


def test_safetensors_cut_inside_its_header_names_the_file(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
        load_quantized(tmp_path)


# ---- nothing outside its place -------------------------------------------------------------------------------------

def test_save_pretrained_never_writes_outside_the_folder(tmp_path):
    model = wrapped_model()
    outside = tmp_path / "outside"
    for name in ("../outside", str(outside)):
        model.peft_config[name] = copy.deepcopy(model.peft_config["default"])  # by hand, past the name checks
        with pytest.raises(ValueError, match="cannot name an adapter"):
            model.save_pretrained(tmp_path / "out")
        del model.peft_config[name]
    assert not outside.exists() and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="No adapter named"):
        model.save_pretrained(tmp_path / "out", selected_adapters=["../outside"])


def test_adapter_file_cannot_overwrite_other_base_weights(saved):
    key = "base_model.model.model.layers.0.mlp.down_proj.weight"
    edit_tensors(saved, lambda t: t.update({key: torch.full((32, 48), 7.0)}))
    model = make_model("llama")
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    with pytest.warns(UserWarning, match=rf"not loading tensors that would overwrite base model weights.*{key}"):
        loaded = dt.PeftModel.from_pretrained(model, saved)
    assert torch.equal(loaded.get_base_model().model.layers[0].mlp.down_proj.weight, before)


def test_embedding_weights_peft_saves_load_with_a_warning_naming_them(tmp_path):
    source = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with torch.no_grad():
        source.get_base_model().model.embed_tokens.weight.add_(1.0)  # e.g. new tokens trained in
    source.save_pretrained(tmp_path, save_embedding_layers=True)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in load_file(tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match=rf"replaces base model weights.*\['{key}'\]"):
        loaded = dt.PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert torch.equal(loaded.get_base_model().model.embed_tokens.weight,
                       source.get_base_model().model.embed_tokens.weight)  # PEFT's behaviour is kept


def test_biases_saved_with_bias_all_load_with_a_warning_naming_them(tmp_path):
    source = dt.get_peft_model(make_model("qwen2"), dt.LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    with torch.no_grad():
        source.get_base_model().model.layers[1].self_attn.k_proj.bias.add_(1.0)
    source.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"replaces base model weights.*\['base_model\.model\.model\.layers\.1\."
                                         r"self_attn\.k_proj\.bias'\]"):
        loaded = dt.PeftModel.from_pretrained(make_model("qwen2"), tmp_path)
    assert torch.equal(loaded.get_base_model().model.layers[1].self_attn.k_proj.bias,
                       source.get_base_model().model.layers[1].self_attn.k_proj.bias)


def test_clean_adapter_loads_without_warnings(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.PeftModel.from_pretrained(make_model("llama"), saved)


def test_config_and_weights_are_written_atomically(tmp_path, monkeypatch):
    model = wrapped_model()
    model.save_pretrained(tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def torn(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", torn)
    perturb(model, seed=9)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # no torn file, no temporary left
