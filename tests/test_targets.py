"""Target selection follows PEFT's rules, so one config means one thing in both libraries."""

from __future__ import annotations

import pytest

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from deltatune.targets import find_targets
from tests.conftest import make_model


def _adapted(kind: str, **kwargs) -> list[str]:
    model = dt.get_peft_model(make_model(kind), dt.LoraConfig(r=2, **kwargs))
    return sorted(n.removeprefix("base_model.model.") for n, _ in adapter_layers(model)
                  if "lm_head" not in n and "classifier" not in n)


def test_list_matches_exact_name_or_dotted_suffix():
    names = _adapted("llama", target_modules=["q_proj", "model.layers.1.mlp.up_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                     "model.layers.1.self_attn.q_proj"]


def test_list_does_not_match_partial_names():
    with pytest.raises(ValueError, match="matched no module"):
        _adapted("llama", target_modules=["proj"])


def test_string_is_fullmatch_regex():
    assert _adapted("llama", target_modules=r".*\.1\.self_attn\.(k|o)_proj") == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]
    with pytest.raises(ValueError):
        _adapted("llama", target_modules="q_proj")  # fullmatch on the full name: no module is just "q_proj"


def test_all_linear_skips_output_head():
    names = _adapted("llama", target_modules="all-linear")
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    bert = _adapted("bert", target_modules="all-linear", task_type="SEQ_CLS")
    assert "bert.pooler.dense" in bert and not any("classifier" in n for n in bert)
    gpt2 = _adapted("gpt2", target_modules="all-linear")
    assert len(gpt2) == 2 * 4  # Conv1D layers count as linear


def test_exclude_modules():
    names = _adapted("llama", target_modules="all-linear", exclude_modules=["down_proj", "gate_proj"])
    assert not any("down_proj" in n or "gate_proj" in n for n in names) and len(names) == 2 * 5
    names = _adapted("llama", target_modules=["q_proj"], exclude_modules=r"model\.layers\.0\..*")
    assert names == ["model.layers.1.self_attn.q_proj"]


def test_layers_to_transform_and_pattern():
    assert _adapted("llama", target_modules=["q_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.q_proj"]
    assert _adapted("gpt2", target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h") == [
        "transformer.h.0.attn.c_attn"]


@pytest.mark.parametrize(("kind", "expected"), [
    ("llama", {"q_proj", "v_proj"}), ("qwen2", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}),
    ("bert", {"query", "value"}), ("t5", {"q", "v"}),
])
def test_default_targets_per_architecture(kind, expected):
    config = dt.LoraConfig(r=2)
    dt.get_peft_model(make_model(kind), config)
    assert set(config.target_modules) == expected


def test_no_match_lists_closest_names():
    model = make_model("llama")
    with pytest.raises(ValueError) as err:
        find_targets(model, ["q_prj", "vproj"])
    assert "q_proj" in str(err.value) and "v_proj" in str(err.value)
