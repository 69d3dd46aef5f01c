"""``PeftModel.add_weighted_adapter`` and ``deltatune merge-adapters``, with HF PEFT as the oracle.

Both libraries get the same adapters (PEFT's random values copied into ours), combine them with the same
arguments and the same torch seed, and must then give the same logits and the same update scaling * B A in every
layer. DARE draws random masks: where the new adapter's initialisation consumes the generator as PEFT's does, the
draws and so the results are equal; elsewhere (inputs with rank_pattern, whose result PEFT sizes differently) the
statistics are checked.
"""

from __future__ import annotations

import inspect
import json
import os

import peft
import pytest
import torch
from peft.utils import merge_utils
from torch import nn

import deltatune
from deltatune import cli
from deltatune.methods.lora import LoraLayer
from deltatune.methods.lora_combine import COMBINATION_TYPES, combine_tensors

from ..conftest import logits, make_model, model_inputs, perturb
from ..train.tiny import make_tiny_model_dir

BASE = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
# name -> (model kind, the configs of the adapters "default", "a1", ...)
CASES = {
    "llama": ("llama", [{**BASE, "target_modules": ["q_proj", "v_proj"]},
                        {**BASE, "target_modules": ["q_proj", "v_proj"], "lora_alpha": 3}]),
    "three": ("llama", [{**BASE, "target_modules": ["q_proj", "v_proj"]},
                        {**BASE, "target_modules": ["v_proj", "q_proj"], "lora_alpha": 2},
                        {**BASE, "target_modules": ["q_proj", "v_proj"], "lora_alpha": 5}]),
    "gpt2_fan_in_fan_out_and_embedding": ("gpt2", [{**BASE, "target_modules": ["c_attn", "wte"]},
                                                   {**BASE, "target_modules": ["c_attn", "c_proj"], "lora_alpha": 3}]),
    "llama_embedding_and_down_proj": ("llama", [{**BASE, "target_modules": ["q_proj", "embed_tokens", "down_proj"]},
                                             {**BASE, "target_modules": ["q_proj", "embed_tokens", "down_proj"],
                                              "lora_alpha": 3}]),
    "patterns": ("llama", [{**BASE, "r": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4},
                            "alpha_pattern": {"q_proj": 2}},
                           {**BASE, "r": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4},
                            "lora_alpha": 3}]),
}
UNEQUAL_RANKS = ("llama", [{**BASE, "target_modules": ["q_proj", "v_proj"]},
                           {**BASE, "target_modules": ["q_proj", "v_proj"], "r": 6, "lora_alpha": 3}])
TYPES = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
         "dare_ties_svd", "magnitude_prune_svd"]
RANDOM = {"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"}
DENSITY = {t: 0.5 for t in TYPES if t not in ("linear", "cat", "svd")}
WEIGHTS = [0.7, -0.3, 1.5]


def _pair(kind, configs, seed=0):
    """Our model and PEFT's with the same adapters "default", "a1", ... holding the same random values."""
    torch.manual_seed(seed)
    ours = deltatune.get_peft_model(make_model(kind), deltatune.LoraConfig(**configs[0]))
    theirs = peft.get_peft_model(make_model(kind), peft.LoraConfig(**configs[0]))
    for i, config in enumerate(configs[1:], 1):
        ours.add_adapter(f"a{i}", deltatune.LoraConfig(**config))
        theirs.add_adapter(f"a{i}", peft.LoraConfig(**config))
    perturb(theirs, seed=5)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    return ours, theirs


def _names(configs):
    return ["default", *(f"a{i}" for i in range(1, len(configs)))]


def _combine(model, names, kind, seed=7, **kwargs):
    torch.manual_seed(seed)
    model.add_weighted_adapter(names, WEIGHTS[:len(names)], "mix", combination_type=kind,
                               **({"density": DENSITY[kind]} if kind in DENSITY else {}), **kwargs)
    frozen = not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)
    model.set_adapter("mix")
    return frozen


def _deltas(model, name="mix"):
    """Layer path -> scaling * B A of adapter ``name`` (PEFT's get_delta_weight and ours agree on the layout)."""
    out = {}
    for path, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and name in scaling:
            out[path] = (module.delta_weight(name) if isinstance(module, LoraLayer)
                         else module.get_delta_weight(name)).detach()
    return out


def _expected_sum(model, names, path):
    """sum_i w_i scaling_i B_i A_i at one layer: what "cat" gives exactly and a full-rank "svd" approximates."""
    layer = model.get_submodule(path)
    return sum(w * layer.delta_weight(n) for n, w in zip(names, WEIGHTS, strict=False) if n in layer.r)


# every type on every case, but the "*_svd" variants (the SVD code of "svd" after the weightings of the others)
# only on the Llama, and DARE with rank patterns only by its statistics (PEFT sizes that result differently, so
# its initialisation draws other random numbers before the masks)
PAIRS = [(case, kind) for case in CASES for kind in TYPES
         if not (kind.endswith("_svd") and case != "llama") and not (case == "patterns" and kind in RANDOM)]


@pytest.mark.parametrize(("case", "kind"), PAIRS, ids=[f"{c}-{k}" for c, k in PAIRS])
def test_combination_equals_peft(case, kind):
    model_kind, configs = CASES[case]
    ours, theirs = _pair(model_kind, configs)
    names = _names(configs)
    assert _combine(ours, names, kind) and _combine(theirs, names, kind)  # made frozen, as in PEFT
    inputs = model_inputs(model_kind)
    assert torch.allclose(logits(ours, inputs), logits(theirs, inputs), atol=1e-5)
    mine, peft_deltas = _deltas(ours), _deltas(theirs)
    assert mine.keys() == peft_deltas.keys()
    for path in mine:
        assert torch.allclose(mine[path], peft_deltas[path], atol=1e-5), path
    config, peft_config = ours.peft_config["mix"], theirs.peft_config["mix"]
    assert (config.r, config.lora_alpha) == (peft_config.r, peft_config.lora_alpha)
    assert sorted(config.target_modules) == sorted(peft_config.target_modules)


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_cat_and_svd_take_unequal_ranks_like_peft(kind):
    model_kind, configs = UNEQUAL_RANKS
    ours, theirs = _pair(model_kind, configs)
    _combine(ours, ["default", "a1"], kind)
    _combine(theirs, ["default", "a1"], kind)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r == {"cat": 10, "svd": 6}[kind]
    inputs = model_inputs(model_kind)
    assert torch.allclose(logits(ours, inputs), logits(theirs, inputs), atol=1e-5)
    if kind == "cat":  # the update is sum_i w_i s_i B_i A_i exactly
        for path, delta in _deltas(ours).items():
            assert torch.allclose(delta, _expected_sum(ours, ["default", "a1"], path), atol=1e-5)


def test_svd_rank_clamp_and_full_matrices_follow_peft():
    model_kind, configs = CASES["llama"]
    ours, theirs = _pair(model_kind, configs)
    for model in (ours, theirs):
        _combine(model, ["default", "a1"], "svd", svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)
    assert ours.peft_config["mix"].r == 3 and ours.peft_config["mix"].lora_alpha == 3
    layer = ours.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert layer.lora_A["mix"].weight.shape == (3, 32)
    peft_layer = theirs.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert torch.allclose(layer.lora_A["mix"].weight, peft_layer.lora_A["mix"].weight, atol=1e-6)
    assert torch.allclose(layer.lora_B["mix"].weight, peft_layer.lora_B["mix"].weight, atol=1e-6)


def test_svd_of_full_rank_is_the_exact_weighted_sum():
    model_kind, configs = CASES["llama"]
    ours, _ = _pair(model_kind, configs)
    _combine(ours, ["default", "a1"], "svd", svd_rank=8)  # 4 + 4: the sum's rank
    for path, delta in _deltas(ours).items():
        assert torch.allclose(delta, _expected_sum(ours, ["default", "a1"], path), atol=1e-5)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_majority_sign_methods_follow_peft(method):
    model_kind, configs = CASES["three"]
    ours, theirs = _pair(model_kind, configs)
    for model in (ours, theirs):
        _combine(model, _names(configs), "ties", majority_sign_method=method)
    inputs = model_inputs(model_kind)
    assert torch.allclose(logits(ours, inputs), logits(theirs, inputs), atol=1e-5)


def test_single_adapter_is_linear_as_in_peft():
    model_kind, configs = CASES["llama"]
    ours, theirs = _pair(model_kind, configs)
    for model in (ours, theirs):
        torch.manual_seed(7)
        model.add_weighted_adapter(["a1"], [2.0], "mix", combination_type="cat")
        model.set_adapter("mix")
    for path, delta in _deltas(ours).items():
        assert torch.allclose(delta, 2.0 * ours.get_submodule(path).delta_weight("a1"), atol=1e-6)
    inputs = model_inputs(model_kind)
    assert torch.allclose(logits(ours, inputs), logits(theirs, inputs), atol=1e-5)


def test_conv_layers_combine_like_peft():
    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.pointwise = nn.Conv2d(6, 5, 1)

        def forward(self, x):
            return self.pointwise(torch.relu(self.conv(x)))

    config = {**BASE, "target_modules": ["conv", "pointwise"]}
    x = torch.randn(2, 3, 6, 6)
    for kind in ("linear", "cat", "svd", "ties"):
        torch.manual_seed(0)
        ours = deltatune.get_peft_model(Convs(), deltatune.LoraConfig(**config))
        torch.manual_seed(0)
        theirs = peft.get_peft_model(Convs(), peft.LoraConfig(**config))
        for model, cls in ((ours, deltatune.LoraConfig), (theirs, peft.LoraConfig)):
            model.add_adapter("a1", cls(**{**config, "lora_alpha": 3}))
        perturb(theirs, seed=5)
        ours.load_state_dict(theirs.state_dict(), strict=False)
        for model in (ours, theirs):
            _combine(model, ["default", "a1"], kind)
        with torch.no_grad():
            assert torch.allclose(ours(x), theirs(x), atol=1e-5), kind


def test_dare_keeps_a_density_fraction_rescaled_and_draws_as_peft():
    tensor = torch.randn(400, 500)
    torch.manual_seed(11)
    ours = combine_tensors([tensor], torch.tensor([1.0]), "dare_linear", density=0.3)
    torch.manual_seed(11)
    theirs = merge_utils.dare_linear([tensor], torch.tensor([1.0]), 0.3)
    assert torch.equal(ours, theirs)  # the same draws in the same order
    kept = ours != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(ours[kept], tensor[kept] / 0.3)
    for kind, peft_fn in (("dare_ties", merge_utils.dare_ties), ("ties", merge_utils.ties),
                          ("magnitude_prune", merge_utils.magnitude_prune)):
        tensors = [torch.randn(50, 60) for _ in range(3)]
        weights = torch.tensor([0.5, -1.0, 2.0])
        torch.manual_seed(3)
        ours = combine_tensors(tensors, weights, kind, density=0.4)
        torch.manual_seed(3)
        assert torch.equal(ours, peft_fn(tensors, weights, 0.4)), kind


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_with_rank_patterns_has_peft_statistics(kind):
    """With rank_pattern inputs the draws differ from PEFT's; what a draw does must not: each input factor keeps about
    ``density`` of its entries, and over many seeds "dare_linear" averages to "linear"."""
    model_kind, configs = CASES["patterns"]
    ours, _ = _pair(model_kind, configs)
    path = "base_model.model.model.layers.0.self_attn.v_proj"
    _combine(ours, ["default", "a1"], "linear")
    linear = ours.get_submodule(path).lora_A["mix"].weight.detach().clone()
    draws = []
    for seed in range(60):
        name = f"d{seed}"
        torch.manual_seed(seed)
        ours.add_weighted_adapter(["default", "a1"], WEIGHTS[:2], name, combination_type=kind, density=0.5)
        draws.append(ours.get_submodule(path).lora_A[name].weight.detach().clone())
        ours.delete_adapter(name)
    zero = torch.stack([(d == 0).float().mean() for d in draws]).mean().item()
    assert zero == pytest.approx(0.25, abs=0.03)  # an entry is zero when both inputs dropped it: (1 - 0.5)^2
    if kind == "dare_linear":
        mean = torch.stack(draws).mean(0)
        assert (mean - linear).abs().mean() < 0.15 * linear.abs().mean()


@pytest.mark.parametrize("kind", ["linear", "cat", "svd", "ties", "magnitude_prune", "dare_ties"])
def test_rank_and_alpha_patterns_combine_save_and_load_in_both_libraries(tmp_path, kind):
    model_kind, configs = CASES["patterns"]
    ours, _ = _pair(model_kind, configs)
    _combine(ours, ["default", "a1"], kind)
    inputs = model_inputs(model_kind)
    expected = logits(ours, inputs)
    config = ours.peft_config["mix"]
    layer = ours.get_submodule("base_model.model.model.layers.1.self_attn.v_proj")
    assert config.rank_pattern.get("model.layers.1.self_attn.v_proj", config.r) == layer.r["mix"]
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    folder = tmp_path / "mix"
    reloaded = deltatune.PeftModel.from_pretrained(make_model(model_kind), folder)
    assert torch.allclose(logits(reloaded, inputs), expected, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(make_model(model_kind), folder)
    assert torch.allclose(logits(theirs, inputs), expected, atol=1e-5)


def test_cat_of_adapters_on_different_layers_records_each_layers_rank(tmp_path):
    model_kind, configs = CASES["gpt2_fan_in_fan_out_and_embedding"]
    ours, _ = _pair(model_kind, configs)
    _combine(ours, ["default", "a1"], "cat")
    config = ours.peft_config["mix"]
    assert config.r == 8 and config.rank_pattern["transformer.wte"] == 4  # only "default" adapts wte
    assert config.alpha_pattern == config.rank_pattern  # scaling 1 everywhere
    for path, delta in _deltas(ours).items():
        assert torch.allclose(delta, _expected_sum(ours, ["default", "a1"], path), atol=1e-5)
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    inputs = model_inputs(model_kind)
    theirs = peft.PeftModel.from_pretrained(make_model(model_kind), tmp_path / "mix")
    assert torch.allclose(logits(theirs, inputs), logits(ours, inputs), atol=1e-5)


def test_different_layers_to_transform_name_the_layers_by_path():
    configs = [{**BASE, "target_modules": ["q_proj"], "layers_to_transform": [0]},
               {**BASE, "target_modules": ["q_proj"], "layers_to_transform": [1]}]
    ours, _ = _pair("llama", configs)
    _combine(ours, ["default", "a1"], "cat")
    config = ours.peft_config["mix"]
    assert config.target_modules == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert config.layers_to_transform is None
    assert sorted(_deltas(ours)) == ["base_model.model.model.layers.0.self_attn.q_proj",
                                     "base_model.model.model.layers.1.self_attn.q_proj"]


def test_rslora_inputs_give_the_exact_weighted_sum():
    """PEFT keeps use_rslora on the result, whose scaling r / sqrt(r) then multiplies it by sqrt(r); ours has
    scaling 1."""
    configs = [{**BASE, "target_modules": ["q_proj"], "use_rslora": True},
               {**BASE, "target_modules": ["q_proj"], "use_rslora": True, "lora_alpha": 3}]
    ours, _ = _pair("llama", configs)
    _combine(ours, ["default", "a1"], "cat")
    assert ours.peft_config["mix"].use_rslora is False
    for path, delta in _deltas(ours).items():
        assert torch.allclose(delta, _expected_sum(ours, ["default", "a1"], path), atol=1e-5)


def test_signature_is_peft():
    theirs = inspect.signature(peft.tuners.lora.LoraModel.add_weighted_adapter).parameters
    ours = inspect.signature(deltatune.PeftModel.add_weighted_adapter).parameters
    assert list(theirs) == list(ours)
    assert all(ours[name].default == param.default for name, param in theirs.items())
    assert set(COMBINATION_TYPES) == set(TYPES)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, dict(model.peft_config), repr(model),
            model.active_adapters)


def _llama_pair_ours():
    return _pair(*CASES["llama"])[0]


# (what is wrong, the model, add_weighted_adapter's arguments, the error's words)
BAD_INPUT = [
    ("unequal ranks for linear", lambda: _pair(*UNEQUAL_RANKS)[0],
     dict(adapters=["default", "a1"], weights=[0.5, 0.5], combination_type="linear"), "equal rank"),
    ("unequal ranks for ties", lambda: _pair(*UNEQUAL_RANKS)[0],
     dict(adapters=["default", "a1"], weights=[0.5, 0.5], combination_type="ties", density=0.5), "equal rank"),
    ("fewer weights", _llama_pair_ours, dict(adapters=["default", "a1"], weights=[1.0]), "one number per adapter"),
    ("more weights", _llama_pair_ours, dict(adapters=["default", "a1"], weights=[1.0, 2.0, 3.0]),
     "one number per adapter"),
    ("a weight that is text", _llama_pair_ours, dict(adapters=["default", "a1"], weights=[1.0, "x"]),
     "finite numbers"),
    ("a NaN weight", _llama_pair_ours, dict(adapters=["default", "a1"], weights=[1.0, float("nan")]),
     "finite numbers"),
    ("unknown adapter", _llama_pair_ours, dict(adapters=["default", "nope"], weights=[1.0, 1.0]), "No adapter named"),
    ("no adapters", _llama_pair_ours, dict(adapters=[], weights=[]), "non-empty list"),
    ("existing name", _llama_pair_ours, dict(adapters=["default", "a1"], weights=[1.0, 1.0], adapter_name="a1"),
     "exists already"),
    ("unknown combination type", _llama_pair_ours,
     dict(adapters=["default", "a1"], weights=[1.0, 1.0], combination_type="mean"), "Unknown combination_type"),
    ("density zero", _llama_pair_ours,
     dict(adapters=["default", "a1"], weights=[1.0, 1.0], combination_type="ties", density=0.0), "density"),
    ("density above one", _llama_pair_ours,
     dict(adapters=["default", "a1"], weights=[1.0, 1.0], combination_type="dare_linear", density=1.5), "density"),
    ("density missing", _llama_pair_ours,
     dict(adapters=["default", "a1"], weights=[1.0, 1.0], combination_type="dare_ties"), "give density"),
    ("unknown sign method", _llama_pair_ours, dict(adapters=["default", "a1"], weights=[1.0, 1.0],
                                                   combination_type="ties", density=0.5, majority_sign_method="max"),
     "majority_sign_method"),
    ("svd_rank zero", _llama_pair_ours, dict(adapters=["default", "a1"], weights=[1.0, 1.0], svd_rank=0), "svd_rank"),
    ("svd_driver on CPU", _llama_pair_ours, dict(adapters=["default", "a1"], weights=[1.0, 1.0], svd_driver="gesvd"),
     "CUDA only"),
]


@pytest.mark.parametrize(("what", "make", "arguments", "words"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_refused_and_leaves_the_model_unchanged(what, make, arguments, words):
    model = make()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=words):
        model.add_weighted_adapter(**{"adapter_name": "mix", **arguments})
    state, configs, text, active = _snapshot(model)
    assert configs == before[1] and text == before[2] and active == before[3]
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)


def test_a_failure_after_attaching_takes_the_new_adapter_off(monkeypatch):
    from deltatune.methods import lora_combine

    model = _llama_pair_ours()
    before = _snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lora_combine, "_cat", broken)
    with pytest.raises(RuntimeError, match="boom"):
        model.add_weighted_adapter(["default", "a1"], [1.0, 1.0], "mix", combination_type="cat")
    state, configs, text, _ = _snapshot(model)
    assert configs == before[1] and text == before[2] and state.keys() == before[0].keys()


def test_two_copies_of_a_module_to_save_are_refused_as_in_peft():
    config = {**BASE, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    ours, _ = _pair("llama", [config, config])
    before = _snapshot(ours)
    with pytest.raises(ValueError, match="modules_to_save"):
        ours.add_weighted_adapter(["default", "a1"], [1.0, 1.0], "mix", combination_type="cat")
    assert _snapshot(ours)[1:] == before[1:]


# ---- deltatune merge-adapters ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny Llama as an HF folder and two LoRA adapters trained on it (random values), saved as PEFT folders."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("combine")
    model_dir = make_tiny_model_dir(str(root / "model"))
    folders = []
    for i, alpha in enumerate((8, 3)):
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                    peft.LoraConfig(**{**BASE, "lora_alpha": alpha,
                                                       "target_modules": ["q_proj", "v_proj"]}))
        perturb(model, seed=10 + i)
        folder = str(root / f"adapter{i}")
        model.save_pretrained(folder)
        folders.append(folder)
    return model_dir, folders


def _load_combined_like_peft(model_dir, folders, kind, density=None):
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folders[0],
                                           adapter_name="x0")
    model.load_adapter(folders[1], adapter_name="x1")
    torch.manual_seed(0)
    model.add_weighted_adapter(["x0", "x1"], [0.7, 0.3], "mix", combination_type=kind, density=density)
    model.set_adapter("mix")
    return model


@pytest.mark.parametrize(("kind", "extra"), [("ties", ["--density", "0.5"]), ("cat", []), ("svd", [])])
def test_merge_adapters_command_writes_what_peft_computes(saved, tmp_path, kind, extra, capsys):
    from transformers import AutoModelForCausalLM

    model_dir, folders = saved
    out = str(tmp_path / "mixed")
    code = cli.main(["merge-adapters", *folders, "--weights", "0.7,0.3", "--type", kind, *extra, "--output", out])
    assert code == 0 and out in capsys.readouterr().out
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == model_dir
    expected = _load_combined_like_peft(model_dir, folders, kind, 0.5 if extra else None)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    inputs = {"input_ids": torch.tensor([[5, 9, 40, 77, 120, 3]])}
    assert torch.allclose(logits(loaded, inputs), logits(expected, inputs), atol=1e-5)


def test_merge_adapters_refuses_to_overwrite_and_bad_input_in_one_line(saved, tmp_path, capsys):
    model_dir, folders = saved
    out = str(tmp_path / "mixed")
    assert cli.main(["merge-adapters", *folders, "--weights", "0.5,0.5", "--type", "linear", "--output", out]) == 0
    capsys.readouterr()
    cases = [
        (["--weights", "0.5,0.5", "--type", "linear", "--output", out], "--overwrite"),
        (["--weights", "0.5", "--type", "linear", "--output", str(tmp_path / "b")], "one number per adapter"),
        (["--weights", "0.5,x", "--type", "linear", "--output", str(tmp_path / "c")], "comma-separated numbers"),
        (["--weights", "0.5,0.5", "--type", "ties", "--output", str(tmp_path / "d")], "give density"),
        (["--weights", "0.5,0.5", "--type", "linear", "--output", folders[0], "--overwrite"], "input adapter"),
    ]
    for flags, words in cases:
        assert cli.main(["merge-adapters", *folders, *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "d")
    assert cli.main(["merge-adapters", *folders, "--weights", "0.2,0.8", "--type", "linear", "--output", out,
                     "--overwrite"]) == 0


def test_merge_adapters_refuses_a_non_lora_adapter(saved, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir, folders = saved
    ia3 = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                              peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    assert cli.main(["merge-adapters", folders[0], str(tmp_path / "ia3"), "--weights", "1,1", "--output",
                     str(tmp_path / "out")]) == 2
    assert "only LoRA adapters" in capsys.readouterr().err


def test_merge_adapters_refuses_adapters_of_different_base_models(saved, tmp_path, capsys):
    import shutil

    model_dir, folders = saved
    other = str(tmp_path / "other")
    shutil.copytree(folders[1], other)
    path = os.path.join(other, "adapter_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["base_model_name_or_path"] = "/somewhere/else"
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    argv = ["merge-adapters", folders[0], other, "--weights", "1,1", "--type", "cat", "--output"]
    assert cli.main([*argv, str(tmp_path / "out")]) == 2
    assert "different base models" in capsys.readouterr().err
    assert cli.main([*argv, str(tmp_path / "out"), "--model", model_dir]) == 0  # --model settles it


def test_rank_pattern_keys_are_escaped_where_a_path_would_match_another():
    from deltatune.methods.lora_combine import _exact_keys
    from deltatune.targets import resolve_pattern

    ranks = {"m.layers.1.q": 4, "m.layers_1_q": 8}  # "." in the first key would match the "_" of the second
    pattern = _exact_keys(ranks, 8)
    assert pattern == {r"m\.layers\.1\.q": 4}
    assert all(resolve_pattern(pattern, path, 8) == rank for path, rank in ranks.items())
    assert _exact_keys({"model.layers.0.q_proj": 4, "model.layers.1.q_proj": 8}, 8) == {"model.layers.0.q_proj": 4}


def test_all_linear_inputs_keep_all_linear():
    configs = [{**BASE, "target_modules": "all-linear"}, {**BASE, "target_modules": "all-linear", "lora_alpha": 3}]
    ours, theirs = _pair("llama", configs)
    for model in (ours, theirs):
        _combine(model, ["default", "a1"], "ties")
    assert ours.peft_config["mix"].target_modules == "all-linear"
    assert len(_deltas(ours)) == 14  # 7 linear layers per block, not the output head
    inputs = model_inputs("llama")
    assert torch.allclose(logits(ours, inputs), logits(theirs, inputs), atol=1e-5)
