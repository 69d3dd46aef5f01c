"""LoRA layer math, checked against the formula h = W0 x + (alpha / r) B A x written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.lora import LoraLayer


def _layer(base: nn.Module, r: int = 4, alpha: float = 8, init=False, **kwargs) -> LoraLayer:
    layer = LoraLayer(base, fan_in_fan_out=isinstance(base, Conv1D))
    layer.add_adapter("a", r=r, lora_alpha=alpha, init_lora_weights=init, **kwargs)
    layer.active_adapters = ["a"]
    return layer


def test_linear_forward_is_w0x_plus_scaled_bax():
    base = nn.Linear(10, 6)
    layer = _layer(base)
    x = torch.randn(5, 10)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = x @ base.weight.T + base.bias + (8 / 4) * (x @ a.T @ b.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_rslora_scales_by_sqrt_r():
    layer = _layer(nn.Linear(4, 4), r=16, alpha=8, use_rslora=True)
    assert layer.scaling["a"] == pytest.approx(8 / math.sqrt(16))


def test_gpt2_conv1d_uses_transposed_weight():
    base = Conv1D(6, 10)  # nf=6 outputs, nx=10 inputs; weight stored (10, 6)
    layer = _layer(base)
    x = torch.randn(2, 3, 10)
    expected = x @ base.weight + base.bias + 2 * (x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.delta_weight("a").shape == base.weight.shape


@pytest.mark.parametrize("conv", [nn.Conv1d(3, 5, 3, padding=1), nn.Conv2d(3, 5, (3, 2), stride=2),
                                  nn.Conv3d(3, 5, 1), nn.Conv2d(3, 5, 1)])
def test_conv_forward_matches_conv_with_merged_weight(conv):
    layer = _layer(conv)
    x = torch.randn(2, 3, *([6] * (conv.weight.dim() - 2)))
    merged = type(conv)(3, 5, conv.kernel_size, conv.stride, conv.padding)
    with torch.no_grad():
        merged.weight.copy_(conv.weight + layer.delta_weight("a"))
        merged.bias.copy_(conv.bias)
    assert torch.allclose(layer(x), merged(x), atol=1e-5)


def test_embedding_forward_and_padding_idx():
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = _layer(base, r=3, alpha=3)
    ids = torch.tensor([[0, 4, 19], [7, 7, 1]])
    table = base.weight + (layer.lora_embedding_B["a"] @ layer.lora_embedding_A["a"]).T
    assert torch.allclose(layer(ids), table[ids], atol=1e-6)


def test_init_true_is_kaiming_a_and_zero_b():
    layer = _layer(nn.Linear(64, 32), r=8, init=True)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.abs().max() <= bound and a.abs().max() > bound * 0.8
    emb = _layer(nn.Embedding(10, 4), init=True)
    assert torch.count_nonzero(emb.lora_embedding_A["a"]) == 0 and emb.lora_embedding_B["a"].std() > 0.5


def test_init_gaussian_has_std_one_over_r():
    torch.manual_seed(0)
    layer = _layer(nn.Linear(512, 8), r=4, init="gaussian")
    assert layer.lora_A["a"].weight.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0


def test_dropout_only_on_lora_path_in_training():
    base = nn.Linear(8, 8)
    layer = _layer(base, lora_dropout=0.5)
    x = torch.randn(200, 8)
    layer.train()
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    no_dropout = base(x) + 2 * (x @ a.T @ b.T)
    assert not torch.allclose(layer(x), no_dropout, atol=1e-3)
    layer.eval()
    assert torch.allclose(layer(x), no_dropout, atol=1e-5)


def test_unmerge_restores_weight_within_fp32_rounding():
    base = nn.Linear(32, 16)
    original = base.weight.detach().clone()
    layer = _layer(base)
    layer.merge()
    assert not torch.allclose(base.weight, original)
    layer.unmerge()
    assert torch.allclose(base.weight, original, atol=1e-6, rtol=0)


def test_safe_merge_refuses_nan_and_leaves_weight():
    base = nn.Linear(4, 4)
    layer = _layer(base)
    with torch.no_grad():
        layer.lora_B["a"].weight[0, 0] = float("nan")
    before = base.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert torch.equal(base.weight, before) and not layer.merged_adapters


def test_safe_merge_on_model_checks_every_layer_first():
    from tests.conftest import make_model, perturb

    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2))
    perturb(model)
    last_b = model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    with torch.no_grad():
        last_b[0, 0] = float("inf")
    first = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, first)


def test_rank_and_alpha_patterns_apply_per_module():
    from tests.conftest import make_model

    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 1}))
    layers = model.base_model.model.model.layers
    assert layers[0].self_attn.q_proj.r["default"] == 4 and layers[1].self_attn.q_proj.r["default"] == 2
    assert layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(1 / 4)
    assert layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(2)


def test_fp16_base_keeps_adapter_in_fp32_and_output_dtype():
    base = nn.Linear(8, 8).half()
    layer = _layer(base)
    assert layer.lora_A["a"].weight.dtype == torch.float32
    out = layer(torch.randn(2, 8).half())
    assert out.dtype == torch.float16


def test_config_validation_messages():
    with pytest.raises(ValueError, match="positive integer"):
        dt.LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias must be"):
        dt.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="init_lora_weights"):
        dt.LoraConfig(init_lora_weights="corda")
    with pytest.raises(ValueError, match="lora_dropout"):
        dt.LoraConfig(lora_dropout=1.5)


def test_defaults_match_peft():
    import peft

    ours, theirs = dt.LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
                 "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
                 "rank_pattern", "alpha_pattern", "task_type", "inference_mode"):
        assert getattr(ours, name) == getattr(theirs, name), name


# ---- the fused training path (_FusedLoraLinear) -------------------------------------------------------------------


def _fusable_base(kind: str) -> nn.Module:
    from deltatune.quant import Linear4bit, Linear8bit

    torch.manual_seed(0)
    linear = nn.Linear(70, 24)  # 70 * 24 is not a multiple of the 4-bit block size
    linear.requires_grad_(False)
    if kind == "linear":
        return linear
    return Linear4bit.from_linear(linear) if kind == "nf4" else Linear8bit.from_linear(linear)


def _reference_grads(layer: LoraLayer, x: torch.Tensor, grad: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """base(x) + s B A dropout(x) written with plain ops on the float (dequantized) weight; grads of x, A, B."""
    base = layer.base_layer
    weight = base.weight if isinstance(base, nn.Linear) else base.dequantized_weight(torch.float32)
    a = layer.lora_A["a"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["a"].weight.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    update = layer.scaling["a"] * (layer.lora_dropout["a"](x) @ a.T @ b.T)
    out = F.linear(x, weight.detach(), base.bias.detach()) + update
    out.backward(grad)
    return [out.detach(), x.grad, a.grad, b.grad]


@pytest.mark.parametrize("kind", ["linear", "nf4", "int8"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_training_path_gives_module_by_module_grads(kind, dropout, input_grad):
    layer = _layer(_fusable_base(kind), r=4, alpha=8, lora_dropout=dropout).train()
    x = torch.randn(2, 5, 70, requires_grad=input_grad)
    grad = torch.randn(2, 5, 24)
    torch.manual_seed(7)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "FusedLoraLinearBackward"  # the path under test was taken
    out.backward(grad)
    expected = _reference_grads(layer, x, grad, seed=7)
    got = [out.detach(), x.grad, layer.lora_A["a"].weight.grad, layer.lora_B["a"].weight.grad]
    for name, g, e in zip(["output", "x", "A", "B"], got, expected, strict=True):
        if e is None:
            assert g is None, name
        else:
            assert torch.allclose(g, e, atol=1e-5, rtol=1e-5), f"{name}: max diff {(g - e).abs().max()}"


@pytest.mark.parametrize("separate_lora_input", [False, True])
def test_fused_backward_passes_gradcheck(separate_lora_input):
    from deltatune.methods.lora_fused import FusedLoraLinear

    base = nn.Linear(6, 5, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    x_lora = torch.randn(3, 6, dtype=torch.float64, requires_grad=True) if separate_lora_input else None
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    inputs = (x, x_lora, a, b, base, 1.5, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: FusedLoraLinear.apply(*t), inputs)


def test_fused_path_steps_aside_when_it_cannot_be_exact():
    """A trainable base weight, two active adapters or no grad mode take the module-by-module path."""
    layer = _layer(_fusable_base("linear"))
    layer.add_adapter("b", r=2, lora_alpha=2, init_lora_weights=False)
    x = torch.randn(3, 70)
    assert type(layer(x).grad_fn).__name__ == "FusedLoraLinearBackward"
    layer.active_adapters = ["a", "b"]
    assert type(layer(x).grad_fn).__name__ != "FusedLoraLinearBackward"
    layer.active_adapters = ["a"]
    layer.base_layer.weight.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.base_layer.weight.grad.abs().sum() > 0
    layer.base_layer.weight.requires_grad_(False)
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    hooked = layer(x)
    assert type(hooked.grad_fn).__name__ != "FusedLoraLinearBackward"
    handle.remove()
    assert torch.allclose(hooked, layer(x) + layer.base_layer(x))  # the hook ran: base counted twice
    with torch.no_grad():
        assert layer(x).grad_fn is None


@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_fused_path_supports_double_backward(kind):
    """A gradient penalty (backward through an input gradient) must see the right weight, not a reused buffer."""
    layer = _layer(_fusable_base(kind), r=4, alpha=8).train()
    other = _layer(_fusable_base(kind), r=4, alpha=8)  # decoding its weight reuses the scratch buffer
    base = layer.base_layer
    weight = base.weight if kind == "linear" else base.dequantized_weight(torch.float32)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    x = torch.randn(6, 70, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    other(torch.randn(6, 70)).sum().backward()
    grad_x.square().sum().backward()
    ref_a = a.detach().clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    out = F.linear(ref_x, weight.detach(), base.bias.detach()) + 2.0 * (ref_x @ ref_a.T @ b.detach().T)
    (ref_grad_x,) = torch.autograd.grad(out.square().sum(), ref_x, create_graph=True)
    ref_grad_x.square().sum().backward()
    assert torch.allclose(a.grad, ref_a.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_path_under_autocast_matches_module_by_module(kind, dropout):
    """Under bf16 autocast the fused path casts as autocast would: same dtypes out, same values to bf16 rounding."""
    results = {}
    for fused in (True, False):
        layer = _layer(_fusable_base(kind), r=4, alpha=8, lora_dropout=dropout).train()
        layer._fusable = fused
        x = torch.randn(2, 5, 70, requires_grad=True, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert (type(out.grad_fn).__name__ == "FusedLoraLinearBackward") == fused
        out.float().square().sum().backward()
        results[fused] = [out, x.grad, layer.lora_A["a"].weight.grad, layer.lora_B["a"].weight.grad]
    for name, got, expected in zip(["output", "x", "A", "B"], results[True], results[False], strict=True):
        assert got.dtype == expected.dtype, name
        scale = expected.float().abs().max()
        assert (got.float() - expected.float()).abs().max() <= 0.02 * scale, name


# ---- the inference short path (LoraLayer._inference_call) ---------------------------------------------------------


def _general_path(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    layer._plain_linear = False
    try:
        return layer(x)
    finally:
        layer._plain_linear = True


@pytest.mark.parametrize("shape", [(5, 70), (2, 5, 70), (4, 1, 70)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_short_path_equals_the_general_path(shape, bias):
    torch.manual_seed(0)
    layer = _layer(nn.Linear(70, 24, bias=bias), r=4, alpha=8, lora_dropout=0.2).eval()
    x = torch.randn(shape)
    calls = []
    original = layer._inference_call
    layer._inference_call = lambda t: calls.append(t) or original(t)
    with torch.no_grad():
        quick = layer(x)
        general = _general_path(layer, x)
    assert len(calls) == 2  # asked both times; the second answered None (no plain linear)
    assert quick.shape == (*shape[:-1], 24)
    expected = F.linear(x, layer.base_layer.weight, layer.base_layer.bias) + 2.0 * (
        x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T)
    assert torch.allclose(quick, expected, atol=1e-5) and torch.allclose(quick, general, atol=1e-5)


def test_inference_short_path_steps_aside_when_the_general_path_differs():
    """Dropout in training mode, a hook, DoRA, two adapters, merged or disabled adapters and autocast all need the
    general path; each call here must equal what that path gives."""
    torch.manual_seed(0)
    x = torch.randn(3, 70)

    def taken(layer: LoraLayer) -> bool:
        with torch.no_grad():
            return layer._inference_call(x) is not None

    layer = _layer(nn.Linear(70, 24), lora_dropout=0.5)
    assert not taken(layer.train()) and taken(layer.eval())
    handle = layer.lora_A["a"].register_forward_hook(lambda module, args, out: out * 0)
    assert not taken(layer)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base_layer(x))  # the hook ran
    handle.remove()
    layer.add_adapter("b", r=2, lora_alpha=2)
    layer.active_adapters = ["a", "b"]
    assert not taken(layer)
    layer.active_adapters = ["a"]
    layer.merge()
    assert not taken(layer)
    layer.unmerge()
    layer.disabled = True
    assert not taken(layer)
    layer.disabled = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not taken(layer)
    dora = _layer(nn.Linear(70, 24), use_dora=True).eval()
    assert not taken(dora)
    assert taken(layer.eval())
    # a parametrized weight or bias (torch.nn.utils.parametrize) is computed on access, not stored: whichever path
    # runs must use the computed one
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return 2 * weight

    for tensor_name in ("weight", "bias", "lora_A"):
        layer = _layer(nn.Linear(70, 24)).eval()
        owner = layer.lora_A["a"] if tensor_name == "lora_A" else layer.base_layer
        parametrize.register_parametrization(owner, "weight" if tensor_name == "lora_A" else tensor_name, Doubled())
        with torch.no_grad():  # the modules themselves apply the parametrization
            expected = layer.base_layer(x) + layer.scaling["a"] * layer.lora_B["a"](layer.lora_A["a"](x))
            assert torch.allclose(layer(x), expected, atol=1e-5), tensor_name


# ---- grouped convolutions (PEFT's shapes: A ungrouped into r channels, B a 1x1 convolution with the base's groups) --


class _GroupedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.depthwise = nn.Conv1d(6, 6, 3, padding=1, groups=6)

    def forward(self, image: torch.Tensor, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(image), self.depthwise(sequence)


_GROUPED_INPUTS = (torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(1)),
                   torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(2)))
_GROUPED_CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["conv", "depthwise"], "rank_pattern": {"depthwise": 6},
                   "init_lora_weights": False}


def _grouped_outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([out.flatten() for out in model(*_GROUPED_INPUTS)])


@pytest.mark.parametrize("writer", ["deltatune", "peft"])
def test_grouped_conv_adapter_moves_between_libraries_with_same_output(writer, tmp_path):
    import copy
    import warnings

    import peft

    torch.manual_seed(0)
    base = _GroupedConvNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that grouped convs cannot merge
        ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**_GROUPED_CONFIG))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_GROUPED_CONFIG))
        shapes = {k.replace(".default", ""): v.shape for k, v in theirs.state_dict().items() if "lora_" in k}
        assert {k.replace(".default", ""): v.shape for k, v in ours.state_dict().items() if "lora_" in k} == shapes
        assert shapes["base_model.model.conv.lora_B.weight"] == (12, 1, 1, 1)  # r / groups = 1 channel per group
        source, reader = (ours, peft.PeftModel) if writer == "deltatune" else (theirs, dt.PeftModel)
        source.save_pretrained(tmp_path)
        loaded = reader.from_pretrained(copy.deepcopy(base), tmp_path)
    expected = _grouped_outputs(source)
    assert (expected - _grouped_outputs(base)).abs().max() > 1e-2  # the adapters change the output
    assert torch.allclose(_grouped_outputs(loaded), expected, atol=1e-5)


def test_grouped_conv_forward_is_base_plus_scaled_grouped_b_of_a():
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=4)
    layer = _layer(conv, r=8, alpha=4)
    x = _GROUPED_INPUTS[0]
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = conv(x) + 0.5 * F.conv2d(F.conv2d(x, a, padding=1), b, groups=4)
    assert b.shape == (12, 2, 1, 1)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_grouped_conv_rank_must_be_a_multiple_of_groups_and_nothing_changes():
    model = _GroupedConvNet()
    with pytest.raises(ValueError, match="groups=4 needs a LoRA rank divisible by 4, got r=6"):
        dt.get_peft_model(model, dt.LoraConfig(r=6, target_modules=["depthwise", "conv"]))
    assert type(model.conv) is nn.Conv2d and type(model.depthwise) is nn.Conv1d
    with pytest.raises(ValueError, match="divisible by 4"):
        _layer(nn.Conv2d(8, 12, 3, groups=4), r=2)


def test_grouped_conv_merge_is_refused_before_anything_changes():
    """B A reaches every input channel through A, so no grouped weight can hold it (PEFT refuses too)."""
    model = dt.get_peft_model(_GroupedConvNet(), dt.LoraConfig(**_GROUPED_CONFIG))
    conv = model.base_model.model.conv
    before = conv.base_layer.weight.detach().clone()
    unmerged = _grouped_outputs(model)
    with pytest.raises(ValueError, match="Cannot merge LoRA into a Conv2d with groups=4"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="groups=4"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(conv.base_layer.weight, before) and not conv.merged_adapters
    assert torch.equal(_grouped_outputs(model), unmerged)
    plain = model.unload()
    assert type(plain.conv) is nn.Conv2d and torch.equal(plain.conv.weight, before)


# ---- orthogonal init ----------------------------------------------------------------------------------------------


def test_orthogonal_init_matches_peft_and_starts_as_a_no_op():
    import copy

    import peft

    from tests.conftest import logits, make_model, model_inputs

    base = make_model("llama")
    inputs = model_inputs("llama")
    kwargs = {"r": 4, "target_modules": ["q_proj"], "init_lora_weights": "orthogonal"}
    torch.manual_seed(5)
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**kwargs))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.abs().min() > 0 and b.abs().min() > 0
    assert (b @ a).abs().max() < 1e-6
    assert torch.allclose(logits(ours, inputs), logits(base, inputs), atol=1e-5)
    for name, tensor in theirs.state_dict().items():
        if "lora_" in name:
            assert torch.equal(ours.state_dict()[name], tensor), name  # same seed, same draws as PEFT


def test_orthogonal_init_needs_even_rank_and_a_linear_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="even rank, got r=3"):
        dt.get_peft_model(model, dt.LoraConfig(r=3, target_modules=["0"], init_lora_weights="orthogonal"))
    with pytest.raises(ValueError, match="linear layers only"):
        dt.get_peft_model(model, dt.LoraConfig(r=2, target_modules=["1"], init_lora_weights="orthogonal"))
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Conv1d


@pytest.mark.default_fusing
@pytest.mark.parametrize("use_dora", [False, True])
def test_small_cpu_layers_train_module_by_module_large_ones_fused(use_dora):
    """By default a CPU training forward takes the fused node only where the layer's work (tokens x in x out)
    reaches FUSED_MIN_WORK, where the node's fixed cost pays; either path gives the same values."""
    from deltatune.methods import lora

    fused_name = "FusedDoraLinearBackward" if use_dora else "FusedLoraLinearBackward"
    torch.manual_seed(0)
    layer = _layer(_fusable_base("linear"), r=4, alpha=8, use_dora=use_dora).train()
    in_features, out_features = layer.base_layer.in_features, layer.base_layer.out_features
    tokens = lora.FUSED_MIN_WORK // (in_features * out_features)
    small = torch.randn(tokens, in_features, requires_grad=True)
    large = torch.randn(tokens + 1, in_features, requires_grad=True)
    assert small.numel() * out_features < lora.FUSED_MIN_WORK <= large.numel() * out_features
    assert type(layer(small).grad_fn).__name__ != fused_name
    assert type(layer(large).grad_fn).__name__ == fused_name
    grads = []
    for threshold in (lora.FUSED_MIN_WORK, 0):  # module by module, then fused, on the same small input
        lora.FUSED_MIN_WORK, saved = threshold, lora.FUSED_MIN_WORK
        try:
            small.grad = None
            layer.zero_grad(set_to_none=True)
            out = layer(small)
            out.square().sum().backward()
            grads.append([out.detach(), small.grad, layer.lora_A["a"].weight.grad, layer.lora_B["a"].weight.grad])
        finally:
            lora.FUSED_MIN_WORK = saved
    for unfused, fused in zip(*grads, strict=True):
        torch.testing.assert_close(unfused, fused, atol=1e-4, rtol=1e-4)
