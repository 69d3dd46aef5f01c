"""DoRA (``LoraConfig(use_dora=True)``) against HF PEFT: one table of layer kinds, every row through the same checks.

Each row is (name, base model factory, config kwargs, inputs). Every row must: name and count its parameters as
PEFT does, load PEFT's file with equal outputs and write one PEFT loads with equal outputs, take the gradients
PEFT takes (training mode, dropout included), merge to the unmerged outputs and unmerge back to the base weights.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.adapter_layer import adapter_layers
from deltatune.methods.lora import LoraLayer
from deltatune.methods.lora_dora import FusedDoraLinear, linear_weight_norm
from tests.conftest import make_model, model_inputs


class ConvNet(nn.Module):
    """Two convolutions of ``dims`` spatial dimensions and a linear head."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv1 = conv(3, 8, 3, padding=1)
        self.conv2 = conv(8, 6, 1, bias=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        hidden = self.conv2(torch.relu(self.conv1(x)))
        return SimpleNamespace(logits=self.head(hidden.flatten(2).mean(-1)))


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():  # GPT-2's own dropouts would draw random numbers between LoRA's
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _conv_case(dims: int):
    def make():
        torch.manual_seed(0)
        return ConvNet(dims)

    shape = (2, 3, *([5] * dims))
    return make, lambda: {"x": torch.randn(shape, generator=torch.Generator().manual_seed(1))}


def _hf(kind: str):
    return (lambda: _no_dropout(make_model(kind))), (lambda: model_inputs(kind))


LLAMA_LINEAR = ["q_proj", "v_proj", "down_proj"]
TABLE = [
    ("llama-linear-dropout", *_hf("llama"), {"target_modules": LLAMA_LINEAR, "lora_dropout": 0.3}),  # eval: none
    ("llama-rslora-rank-pattern", *_hf("llama"),
     {"target_modules": "all-linear", "use_rslora": True, "rank_pattern": {"down_proj": 2}}),
    ("llama-embedding", *_hf("llama"), {"target_modules": ["embed_tokens", "q_proj"]}),
    ("gpt2-conv1d", *_hf("gpt2"), {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
    ("gpt2-conv1d-dropout", *_hf("gpt2"),
     {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "lora_dropout": 0.2}),
    ("conv1d", *_conv_case(1), {"target_modules": ["conv1", "conv2"]}),
    ("conv2d-dropout", *_conv_case(2), {"target_modules": ["conv1", "conv2"], "lora_dropout": 0.25}),
    ("conv3d", *_conv_case(3), {"target_modules": ["conv1"]}),
]


@pytest.fixture(params=TABLE, ids=[row[0] for row in TABLE])
def case(request):
    _, make_base, make_inputs, kwargs = request.param
    config = {"r": 4, "lora_alpha": 8, "use_dora": True, "init_lora_weights": False, **kwargs}
    return make_base(), make_inputs(), config


@torch.no_grad()
def _trained_like(model: nn.Module, seed: int = 5) -> None:
    """A and B random and the magnitude moved off its start by ~20%: every part of DoRA changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
        elif "lora_" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _out(model: nn.Module, inputs: dict, grad: bool = False) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model(**inputs).logits


def _peft_model(base: nn.Module, config: dict) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    _trained_like(model)
    return model


def _pair(base: nn.Module, config: dict, tmp_path) -> tuple[nn.Module, nn.Module]:
    """(deltatune, peft) holding the same trained-like DoRA adapter, read from PEFT's file."""
    theirs = _peft_model(base, config)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    return ours, theirs


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ---- the table --------------------------------------------------------------------------------------------------


def test_parameter_names_and_counts_are_peft(case):
    base, _, config = case
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**config))
    theirs = _peft_model(base, config)
    shapes = {n: p.shape for n, p in _trainable(theirs).items()}
    assert {n: p.shape for n, p in _trainable(ours).items()} == shapes
    assert any("lora_magnitude_vector" in name for name in shapes)


def test_output_at_init_is_base_output_when_b_is_zero(case):
    base, inputs, config = case
    model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**{**config, "init_lora_weights": True})).eval()
    assert torch.allclose(_out(model, inputs), _out(base, inputs), atol=1e-5)


def test_peft_file_loads_with_equal_outputs(case, tmp_path):
    base, inputs, config = case
    ours, theirs = _pair(base, config, tmp_path)
    ours.eval(), theirs.eval()
    expected = _out(theirs, inputs)
    assert (expected - _out(base, inputs)).abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(_out(ours, inputs), expected, atol=1e-5)
    assert torch.allclose(_out(ours, inputs, grad=True), expected, atol=1e-5)  # the fused path, where taken


def test_our_file_loads_in_peft_with_equal_outputs(case, tmp_path):
    base, inputs, config = case
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**config))
    _trained_like(ours, seed=7)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert any(key.endswith(".lora_magnitude_vector") for key in peft.get_peft_model_state_dict(theirs))
    assert torch.allclose(_out(ours.eval(), inputs), _out(theirs, inputs), atol=1e-5)


def test_training_step_gradients_equal_peft(case, tmp_path):
    base, inputs, config = case
    ours, theirs = _pair(base, config, tmp_path)
    for layer in ours.modules():  # nn.Dropout's random stream (SparseDropout draws other masks from a seed)
        if isinstance(layer, LoraLayer):
            for name, dropout in layer.lora_dropout.items():
                if isinstance(dropout, nn.Dropout):
                    layer.lora_dropout[name] = nn.Dropout(dropout.p)
    outputs = {}
    for key, model in (("ours", ours), ("theirs", theirs)):
        model.train()
        torch.manual_seed(11)  # the same dropout masks in both (one draw per adapted layer, in the same order)
        out = model(**inputs).logits
        weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
        (out * weights).sum().backward()
        outputs[key] = out.detach()
    assert torch.allclose(outputs["ours"], outputs["theirs"], atol=1e-5)
    grads = {n: p.grad for n, p in _trainable(theirs).items()}
    assert set(grads) == set(_trainable(ours))
    for name, param in _trainable(ours).items():
        assert param.grad is not None and grads[name] is not None, name
        assert torch.allclose(param.grad, grads[name], atol=1e-4, rtol=1e-4), name


def test_merge_and_unmerge(case, tmp_path):
    base, inputs, config = case
    ours, theirs = _pair(base, config, tmp_path)
    ours.eval(), theirs.eval()
    unmerged = _out(ours, inputs)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge_adapter()
    assert torch.allclose(_out(ours, inputs), unmerged, atol=1e-5)
    ours.unmerge_adapter()
    for name, param in ours.named_parameters():
        if name in before:
            assert torch.allclose(param, before[name], atol=1e-6), name
    assert torch.allclose(_out(ours, inputs), unmerged, atol=1e-5)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert torch.allclose(_out(merged, inputs), _out(theirs.merge_and_unload(), inputs), atol=1e-5)


# ---- several adapters, mixed batches, bad input --------------------------------------------------------------------


def _two_adapters(tmp_path):
    base = make_model("llama")
    config = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_LINEAR, "init_lora_weights": False}
    theirs = _peft_model(base, {**config, "use_dora": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_adapter("plain", peft.LoraConfig(**config))
        theirs.add_adapter("second", peft.LoraConfig(**config, use_dora=True))
    _trained_like(theirs, seed=9)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for name in ("plain", "second"):
        ours.load_adapter(tmp_path / name, adapter_name=name)
    return base, ours, theirs


def test_several_active_adapters_apply_in_turn_as_in_peft(tmp_path):
    base, ours, theirs = _two_adapters(tmp_path)
    inputs = model_inputs("llama")
    names = ["default", "plain", "second"]
    ours.set_adapter(names)
    theirs.base_model.set_adapter(names)
    expected = _out(theirs.eval(), inputs)
    assert torch.allclose(_out(ours.eval(), inputs), expected, atol=1e-5)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge_adapter(["default"])
    ours.merge_adapter(["plain", "second"])  # DoRA's norms are of the unmerged weight, whatever came first
    assert torch.allclose(_out(ours, inputs), expected, atol=1e-5)
    ours.unmerge_adapter()
    assert all(torch.allclose(p, before[n], atol=1e-5) for n, p in ours.named_parameters() if n in before)


def test_mixed_batch_with_dora_is_refused_and_changes_nothing(tmp_path):
    base, ours, theirs = _two_adapters(tmp_path)
    inputs = model_inputs("llama", batch=2)
    ours.eval(), theirs.eval()
    before = _out(ours, inputs)
    with pytest.raises(ValueError, match="DoRA"):
        theirs(**inputs, adapter_names=["default", "plain"])  # PEFT refuses it too
    with pytest.raises(ValueError, match=r"cannot use DoRA adapters \(\['second'\]\)"):
        ours(**inputs, adapter_names=["second", "plain"])
    assert torch.equal(_out(ours, inputs), before)
    with torch.no_grad():
        rows = ours(**inputs, adapter_names=["plain", "__base__"]).logits  # without DoRA adapters it works
    ours.set_adapter("plain")
    assert torch.allclose(rows[0], _out(ours, inputs)[0], atol=1e-6)
    assert torch.allclose(rows[1], _out(base, inputs)[1], atol=1e-6)


class _GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(4, 4, 3)
        self.grouped = nn.Conv2d(4, 8, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(self.plain(x))


@pytest.mark.parametrize(("config", "error"), [
    ({"target_modules": ["plain", "grouped"]}, r"grouped: DoRA \(use_dora=True\) cannot adapt a Conv2d with groups=2"),
    ({"target_modules": ["plain"], "use_dora": "yes"}, r"use_dora must be True or False, got 'yes'"),
])
def test_bad_input_is_refused_and_leaves_the_model_as_it_was(config, error):
    base = _GroupedNet()
    state = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match=error):
        dt.get_peft_model(base, dt.LoraConfig(**{"r": 4, "use_dora": True, **config}))
    assert type(base.plain) is nn.Conv2d and type(base.grouped) is nn.Conv2d
    assert all(torch.equal(value, base.state_dict()[key]) for key, value in state.items())


def test_config_file_says_use_dora_and_peft_reads_it(tmp_path):
    dt.LoraConfig(use_dora=True).save_pretrained(tmp_path)
    assert peft.LoraConfig.from_pretrained(tmp_path).use_dora is True
    assert dt.LoraConfig.from_pretrained(tmp_path).use_dora is True


# ---- quantized bases ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_base_matches_peft_on_the_dequantized_weights(quant, tmp_path):
    """DoRA beside NF4 / int8 codes equals PEFT's DoRA on a float model holding the dequantized weights, in outputs
    and gradients (the fused path rebuilds the weight for the norm and the product)."""
    from deltatune.quant import prepare_model_for_kbit_training, quantize_arguments, quantize_model

    q_base = quantize_model(make_model("llama"), **quantize_arguments(quant))
    float_base = copy.deepcopy(q_base)
    for path, module in list(float_base.named_modules()):
        if callable(getattr(module, "to_linear", None)):
            parent, _, child = path.rpartition(".")
            setattr(float_base.get_submodule(parent), child, module.to_linear(torch.float32))
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_dora": True, "init_lora_weights": False}
    ours, theirs = _pair(float_base, config, tmp_path)
    q_model = dt.PeftModel.from_pretrained(prepare_model_for_kbit_training(q_base), tmp_path, is_trainable=True)
    inputs = model_inputs("llama")
    assert torch.allclose(_out(q_model.eval(), inputs), _out(theirs.eval(), inputs), atol=1e-5)
    for model in (q_model, theirs):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in _trainable(theirs).items()}
    assert all(torch.allclose(p.grad, grads[n], atol=1e-5) for n, p in _trainable(q_model).items())
    merged = q_model.eval().merge_and_unload()  # quantized layers become float Linears with DoRA folded in
    assert torch.allclose(_out(merged, inputs), _out(theirs.eval(), inputs), atol=1e-5)


def test_bitsandbytes_base_matches_peft_and_merges_into_codes(tmp_path):
    """On a bitsandbytes NF4 base (CPU backend): the same outputs as PEFT's DoRA on it, and a merge that
    requantizes the DoRA weight as PEFT's does."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "base")

    def load():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant,
                                                        device_map="cpu", dtype=torch.float32)

    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True,
              "init_lora_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(), peft.LoraConfig(**config))
    assert isinstance(theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    _trained_like(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = dt.PeftModel.from_pretrained(load(), tmp_path / "adapter")
    # training mode (no dropout here): in eval bitsandbytes repacks the codes for its CPU kernel, which changes the
    # base output slightly, and PEFT's dequantization of the repacked weight for the norm more (~1e-2)
    ours.train(), theirs.train()
    inputs = model_inputs("llama")
    assert torch.allclose(_out(ours, inputs), _out(theirs, inputs), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.merge_adapter()
        theirs.merge_adapter()
    assert all(layer.merged for _, layer in adapter_layers(ours))
    assert torch.allclose(_out(ours, inputs), _out(theirs, inputs), atol=1e-5)


# ---- the pieces -------------------------------------------------------------------------------------------------


def test_norm_without_forming_w_plus_ba_equals_the_direct_norm_even_where_it_cancels():
    torch.manual_seed(0)
    weight, a, b = torch.randn(12, 20), torch.randn(3, 20), torch.randn(12, 3)
    b[0] = 0.0
    direct = torch.linalg.vector_norm(weight + 0.5 * b @ a, dim=1)
    assert torch.allclose(linear_weight_norm(weight, a, b, 0.5), direct, rtol=1e-5)
    # row 1 of W is almost exactly -s (B A)_1: ||W_1 + s (B A)_1|| is tiny, and the expansion alone would lose it
    weight[1] = -0.5 * (b[1] @ a) + 1e-4 * torch.randn(20)
    direct = torch.linalg.vector_norm(weight + 0.5 * b @ a, dim=1)
    assert direct[1] < 1e-2
    assert torch.allclose(linear_weight_norm(weight, a, b, 0.5), direct, rtol=1e-4)


@pytest.mark.parametrize("dropout,bias", [(False, True), (False, False), (True, True), (True, False)])
def test_fused_function_gradcheck(dropout, bias):
    """Without dropout and bias the node keeps its output, not u (m's gradient from sum(dy * y) / m)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=bias).double().requires_grad_(False)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    x_lora = (x.detach() * (torch.rand_like(x) > 0.3)).requires_grad_(True) if dropout else None
    # A and B are constants here: the norm depends on them but is detached by design (PEFT's and the paper's
    # choice), so finite differences would not match; their gradients are checked against PEFT's in the table
    a, b = torch.randn(2, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    m = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_(True)

    def run(x, x_lora, a, b, m):
        return FusedDoraLinear.apply(x, x_lora, a, b, m, base, 0.7, torch.float64)

    # a second backward over the graph (gradcheck runs two to check reentrancy) takes m's gradient from u, the first
    # from the kept output: equal up to rounding, not bit for bit
    assert torch.autograd.gradcheck(run, (x, x_lora, a, b, m), nondet_tol=1e-12)


def _fused_grads(m_values, in_place=False, backwards=1):
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=False).requires_grad_(False)
    x = torch.randn(4, 6, requires_grad=True)
    a, b = torch.randn(2, 6, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    m = m_values.clone().requires_grad_(True)
    out = FusedDoraLinear.apply(x, None, a, b, m, base, 0.7, torch.float32)
    if in_place:
        out = torch.relu_(out)  # what nn.ReLU(inplace=True) after the layer does
    weights = torch.randn(out.shape)
    for _ in range(backwards):
        (out * weights).sum().backward(retain_graph=True)
    return [t.grad.clone() for t in (x, a, b, m)]


def _reference_grads(m_values, in_place=False):
    """The same layer module by module (autograd through PEFT's formula, the norm detached)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=False).requires_grad_(False)
    x = torch.randn(4, 6, requires_grad=True)
    a, b = torch.randn(2, 6, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    m = m_values.clone().requires_grad_(True)
    norm = torch.linalg.vector_norm(base.weight + 0.7 * b.detach() @ a.detach(), dim=1)
    out = (m / norm) * (base(x) + 0.7 * (x @ a.t()) @ b.t())
    if in_place:
        out = torch.relu(out)
    (out * torch.randn(out.shape)).sum().backward()
    return [t.grad.clone() for t in (x, a, b, m)]


@pytest.mark.parametrize("case", ["kept output", "output changed in place", "a zero magnitude", "second backward"])
def test_fused_magnitude_gradient_whether_the_output_is_kept_or_u(case):
    """The node keeps y instead of u where it can (m's gradient is then sum(dy * y) / m); where y was changed in
    place by the caller, where m has a zero, or in a second backward over a retained graph, it works from u again."""
    m_values = torch.rand(5) + 0.5
    if case == "a zero magnitude":
        m_values[2] = 0.0
    in_place = case == "output changed in place"
    expected = _reference_grads(m_values, in_place)
    if case == "second backward":
        expected = [2 * g for g in expected]
    got = _fused_grads(m_values, in_place, backwards=2 if case == "second backward" else 1)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_training_forward_is_close_to_fp32():
    """The fused path under CPU bf16 autocast (the main job's default where the CPU has bf16): products in bf16, the
    norm and the magnitude's gradient in fp32."""
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(64, 48))
    layer.add_adapter("a", r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    layer.active_adapters = ["a"]
    x = torch.randn(3, 5, 64)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected, atol=5e-2, rtol=2e-2)
    assert layer.lora_magnitude_vector["a"].weight.grad.dtype == torch.float32


def test_train_flag_dora_sets_use_dora():
    from deltatune import cli
    from deltatune.train.config import config_from_sources, method_config

    assert cli.build_parser().parse_args(["train", "--dora"]).dora is True
    assert method_config(config_from_sources(None, {"dora": True})).use_dora is True
    assert method_config(config_from_sources(None, {})).use_dora is False


def test_safe_merge_checks_the_dora_weight_and_merges_nothing_when_it_is_not_finite():
    """DoRA's merged weight is m / ||W + sBA|| (W + sBA), not W + sBA: safe_merge must check that one, in every
    layer, before the first is written. A magnitude of inf in the last layer leaves W + sBA finite."""
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True))
    _trained_like(model)
    layers = [layer for _, layer in adapter_layers(model)]
    with torch.no_grad():
        layers[-1].lora_magnitude_vector["default"].weight[0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.isfinite(layers[-1].base_weight() + layers[-1].delta_weight("default")).all()
    with pytest.raises(ValueError, match="NaN/Inf; nothing was merged"):
        model.merge_adapter(safe_merge=True)
    assert all(not layer.merged_adapters for layer in layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_in_place_op_after_an_adapted_layer_trains_as_in_peft(use_dora, bias, tmp_path):
    """``nn.ReLU(inplace=True)`` right after an adapted Linear (torchvision's VGG head, many MLPs): the fused training
    node must return a tensor autograd lets a caller change in place, and DoRA must then not use its kept output."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16, bias=bias), nn.ReLU(inplace=True), nn.Linear(16, 16, bias=bias),
                         nn.ReLU(inplace=True), nn.Linear(16, 3))
    config = {"target_modules": ["0", "2"], "r": 4, "lora_alpha": 8, "use_dora": use_dora}
    ours, theirs = _pair(base, config, tmp_path)
    x = torch.randn(5, 12)
    for model in (ours, theirs):
        model.train()
        model(x).square().sum().backward()
    ours_grads, theirs_grads = _trainable(ours), _trainable(theirs)
    assert ours_grads.keys() == theirs_grads.keys()
    for name, param in ours_grads.items():
        assert param.grad.abs().sum() > 0, name
        assert torch.allclose(param.grad, theirs_grads[name].grad, atol=1e-5, rtol=1e-4), name
