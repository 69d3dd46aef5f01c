"""Target selection follows PEFT's rules, so one config means one thing in both libraries."""

from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from deltatune.modules_to_save import ModulesToSaveWrapper
from deltatune.targets import ALL_LINEAR, base_of, find_targets, is_linear_like, is_modules_to_save_wrapper
from tests.conftest import logits, make_model, model_inputs


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


# ---- a second adapter lands where PEFT's would (selection sees through adapter layers) ---------------------------

# Target specs per architecture; every ordered pair (first, second) is one case, so each spec meets every other
# spec both as the adapter already attached and as the one being added.
SPECS: dict[str, list[dict]] = {
    "llama": [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": "all-linear"},
        {"target_modules": r".*\.mlp\.(up|down)_proj"},
        {"target_modules": ["self_attn.o_proj", "model.layers.1.self_attn.k_proj", "lm_head"]},  # LoRA on the head
        {"target_modules": "all-linear", "exclude_modules": ["down_proj", "q_proj"]},
        {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": [1]},
    ],
    "gpt2": [  # Conv1D layers, fan_in_fan_out
        {"target_modules": ["c_attn"]},
        {"target_modules": "all-linear"},
        {"target_modules": ["c_proj"]},
        {"target_modules": r".*\.mlp\.c_fc"},
        {"target_modules": ["c_fc", "c_attn"], "layers_to_transform": [0], "layers_pattern": "h"},
    ],
    "bert": [  # SEQ_CLS: the classifier is a modules_to_save wrapper from the first adapter on
        {"target_modules": ["query", "value"]},
        {"target_modules": "all-linear"},
        {"target_modules": ["dense"]},
        {"target_modules": r".*\.attention\.self\.(query|key)"},
        {"target_modules": "all-linear", "exclude_modules": r".*\.pooler\..*"},
    ],
    "t5": [
        {"target_modules": ["q", "v"]},
        {"target_modules": "all-linear"},
        {"target_modules": ["wi", "wo"]},
        {"target_modules": r"decoder\..*\.(k|o)"},
        {"target_modules": ["q", "k"], "layers_to_transform": [1]},
    ],
}
PAIRS = [(kind, first, second) for kind, specs in SPECS.items() for first in specs for second in specs]
Placement = dict[str, set[tuple[str, str]]]  # adapter -> {("lora" | "modules_to_save", module name)}


def _task(kind: str) -> str | None:
    return "SEQ_CLS" if kind == "bert" else None


def _peft_placement(kind: str, specs: list[dict], task: str | None = "auto") -> Placement:
    """Where HF PEFT puts each adapter ("a0", "a1", ...) when they are added in this order."""
    import peft
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from peft.utils.other import ModulesToSaveWrapper as PeftModulesToSave

    model = None
    for i, spec in enumerate(specs):
        config = peft.LoraConfig(r=2, task_type=_task(kind) if task == "auto" else task, **spec)
        if model is None:
            model = peft.get_peft_model(make_model(kind), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    placement: Placement = {f"a{i}": set() for i in range(len(specs))}
    for name, module in model.base_model.model.named_modules():
        for adapter in placement:
            if isinstance(module, PeftLoraLayer) and adapter in module.lora_A:
                placement[adapter].add(("lora", name))
            if isinstance(module, PeftModulesToSave) and adapter in module.modules_to_save:
                placement[adapter].add(("modules_to_save", name))
    return placement


def _placement(model: dt.PeftModel) -> Placement:
    """Where deltatune put each adapter: the adapter layers whose ``adapter_names()`` list it."""
    placement: Placement = {name: set() for name in model.peft_config}
    for name, layer in adapter_layers(model.get_base_model()):
        kind = "modules_to_save" if isinstance(layer, ModulesToSaveWrapper) else "lora"
        for adapter in layer.adapter_names():
            placement[adapter].add((kind, name))
    return placement


def _deltatune_placement(kind: str, specs: list[dict], task: str | None = "auto") -> Placement:
    model = None
    for i, spec in enumerate(specs):
        config = dt.LoraConfig(r=2, task_type=_task(kind) if task == "auto" else task, **spec)
        if model is None:
            model = dt.get_peft_model(make_model(kind), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    return _placement(model)


@pytest.mark.parametrize(("kind", "first", "second"), PAIRS,
                         ids=[f"{k}-{i // len(SPECS[k])}-{i % len(SPECS[k])}"
                              for k in SPECS for i in range(len(SPECS[k]) ** 2)])
def test_second_adapter_lands_where_peft_puts_it(kind, first, second):
    expected = _peft_placement(kind, [first, second])
    assert expected["a1"], "the oracle placed nothing: the case tests nothing"
    assert _deltatune_placement(kind, [first, second]) == expected


def test_three_adapters_in_a_row_match_peft():
    specs = [{"target_modules": ["q_proj", "v_proj"]}, {"target_modules": "all-linear"},
             {"target_modules": "all-linear", "exclude_modules": ["k_proj"]}]
    assert _deltatune_placement("llama", specs) == _peft_placement("llama", specs)


@pytest.mark.parametrize(("kind", "first"), [
    ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    ("bert", {"target_modules": ["query"], "modules_to_save": ["classifier"]}),
])
def test_all_linear_leaves_another_adapters_modules_to_save_alone(kind, first):
    """A head wrapped by the first adapter's modules_to_save is still the head: all-linear skips it and its copies.

    Deliberate difference: PEFT 0.21.2 puts LoRA on the wrapper's ``original_module`` and
    ``modules_to_save.a0`` copies here (its all-linear sees plain Linears inside the wrapper, although its own
    matcher says adapters must never land on modules_to_save modules; with task_type SEQ_CLS on both adapters,
    as in the table above, PEFT skips them too). Apart from those, PEFT is the oracle.
    """
    second = {"target_modules": "all-linear"}
    peft_placement = _peft_placement(kind, [first, second], task=None)
    head = "lm_head" if kind == "llama" else "classifier"
    expected = {"a0": peft_placement["a0"],
                "a1": {(k, n) for k, n in peft_placement["a1"] if n != head and not n.startswith(head + ".")}}
    assert expected["a1"] != peft_placement["a1"], "PEFT no longer adapts the copies: compare with it directly"
    got = _deltatune_placement(kind, [first, second], task=None)
    assert got == expected
    assert ("modules_to_save", head) in got["a0"] and len(got["a1"]) == (14 if kind == "llama" else 13)


def test_find_targets_never_returns_adapter_internals():
    """Without ``skip_inside``, a regex that also matches ``q_proj.base_layer`` and ``q_proj.lora_A.default``
    still returns only the wrapped layers themselves."""
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2, target_modules="all-linear"))
    base = model.get_base_model()
    found = find_targets(base, r".*\.self_attn\.q_proj.*")
    assert found == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert len(find_targets(base, ALL_LINEAR)) == 14


def test_wrapped_layer_counts_as_its_base_layer():
    model = dt.get_peft_model(make_model("gpt2"), dt.LoraConfig(r=2, target_modules=["c_attn"]))
    wrapped = model.get_base_model().transformer.h[0].attn.c_attn
    assert type(base_of(wrapped)).__name__ == "Conv1D" and is_linear_like(base_of(wrapped))
    bert = dt.get_peft_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    classifier = bert.get_base_model().classifier
    assert is_modules_to_save_wrapper(classifier) and base_of(classifier) is classifier


@pytest.mark.parametrize("saved_by", ["peft", "deltatune"])
@pytest.mark.parametrize("qv_first", [True, False])
def test_load_all_linear_adapter_next_to_qv_adapter_matches_peft(tmp_path, saved_by, qv_first):
    """q,v adapter saved by deltatune, all-linear adapter saved by PEFT (full names in its config) or by deltatune
    (the literal "all-linear"): loading one after the other gives PEFT's logits for either adapter."""
    import peft

    dt.get_peft_model(make_model("llama"), dt.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(tmp_path / "qv")
    lib = peft if saved_by == "peft" else dt
    lib.get_peft_model(make_model("llama", seed=5), lib.LoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)).save_pretrained(tmp_path / "all")
    first, second = ("qv", "all") if qv_first else ("all", "qv")
    inputs = model_inputs("llama")

    ours = dt.PeftModel.from_pretrained(make_model("llama"), tmp_path / first)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "ignoring tensors this model has no place for" fails
        ours.load_adapter(tmp_path / second, "second")
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / first)
    theirs.load_adapter(tmp_path / second, "second")
    for adapter in ("second", "default"):
        ours.set_adapter(adapter)
        theirs.set_adapter(adapter)
        assert torch.allclose(logits(ours, inputs), logits(theirs, inputs), atol=1e-5), adapter
    qv_name, all_name = ("default", "second") if qv_first else ("second", "default")
    assert len(_placement(ours)[qv_name]) == 4  # q, v in both blocks
    assert len(_placement(ours)[all_name]) == 14


def test_naming_another_adapters_modules_to_save_wrapper_is_refused_as_in_peft():
    """PEFT raises "Target module ModulesToSaveWrapper(...) is not supported" here; so do we, changing nothing."""
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"],
                                                                 modules_to_save=["lm_head"]), adapter_name="a0")
    before = _placement(model)
    with pytest.raises(ValueError, match="ModulesToSaveWrapper"):
        model.add_adapter("a1", dt.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert _placement(model) == before


def test_all_linear_shorthand_ignores_letter_case_as_peft_does():
    assert _adapted("llama", target_modules="ALL-Linear") == _adapted("llama", target_modules="all-linear")
    assert len(_adapted("llama", target_modules="ALL-Linear")) == 14
