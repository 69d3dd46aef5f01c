"""torch.func transforms and forward-mode AD through adapters on a bitsandbytes base (``quant.bnb.call_base_layer``).

bitsandbytes' own layers fail inside ``torch.func`` (their matmuls have no transform rules; PEFT's adapters on them
fail the same way). deltatune's LoRA, DoRA and (IA)^3 layers run a 4-bit base with plain ops there: per-sample
gradients by ``vmap(grad(...))`` must equal the regular backward through bitsandbytes' own forward and backward,
sample by sample, and a ``jvp`` the backward's gradient dotted with the tangent. An 8-bit base, whose matmul also
quantizes the input, is refused with an error that says what to use instead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jvp, vmap

import deltatune as dt
from deltatune.quant.bnb import call_base_layer
from tests.conftest import perturb, quiet
from tests.test_func_transforms import per_sample_by_loop, trainable

bnb = pytest.importorskip("bitsandbytes")


def bnb_linear(in_features: int, out_features: int, bits: int, stored: torch.dtype = torch.float32,
               compute: torch.dtype | None = torch.float32, quant_type: str = "nf4", nested: bool = True,
               bias: bool = True) -> nn.Module:
    linear = nn.Linear(in_features, out_features, bias=bias).to(stored)
    if bits == 4:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute, quant_type=quant_type,
                                  compress_statistics=nested)
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


class MLP(nn.Module):
    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.up = bnb_linear(64, 128, bits)
        self.mid = bnb_linear(128, 64, bits)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.mid(F.gelu(self.up(x)))))


CONFIGS = {
    "lora": lambda: dt.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid"]),
    "dora": lambda: dt.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid"], use_dora=True),
    "ia3": lambda: dt.IA3Config(target_modules=["up", "mid"], feedforward_modules=["mid"]),
}


def adapted(method: str, bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = quiet(dt.get_peft_model, MLP(bits), CONFIGS[method]())
    perturb(model, keys=("lora_", "ia3_"))
    return model.train()


def loss_of(model: nn.Module):
    def loss(params, xb, yb):
        return F.cross_entropy(functional_call(model, params, (xb.unsqueeze(0),)), yb.unsqueeze(0))
    return loss


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(5, 64, generator=generator), torch.randint(0, 3, (5,), generator=generator)


def test_bitsandbytes_alone_fails_under_torch_func(batch):
    """The reason for the plain path: a bare bitsandbytes 4-bit layer cannot be differentiated by torch.func."""
    layer = bnb_linear(64, 128, 4)
    with pytest.raises(RuntimeError, match="INTERNAL ASSERT|setup_context"):
        grad(lambda x: layer(x).square().sum())(batch[0])


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_per_sample_gradients_by_vmap_equal_the_backward_through_bitsandbytes(batch, method):
    model = adapted(method)
    x, y = batch
    got = vmap(grad(loss_of(model)), in_dims=(None, 0, 0))(trainable(model), x, y)
    want = per_sample_by_loop(model, x, y)
    assert got.keys() == want.keys() and len(got) >= 2
    for name in got:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_jvp_equals_the_backward_gradient_along_the_tangent(batch):
    model = adapted("lora")
    x, y = batch
    params = trainable(model)
    generator = torch.Generator().manual_seed(5)
    tangents = {name: torch.randn(p.shape, generator=generator) for name, p in params.items()}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    _, directional = jvp(loss, (params,), (tangents,))
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    want = sum((p.grad * tangents[name]).sum() for name, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(directional, want, atol=1e-5, rtol=1e-4)


def test_outside_a_transform_the_base_runs_through_bitsandbytes(batch, monkeypatch):
    """The plain path is taken only inside a transform: a regular forward still calls bitsandbytes' layer."""
    model = adapted("lora")
    calls = []
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward",
                        lambda self, x, _forward=bnb.nn.Linear4bit.forward: calls.append(1) or _forward(self, x))
    model(batch[0])
    assert len(calls) == 2


def test_an_8bit_base_under_a_transform_is_a_clear_error(batch):
    model = adapted("lora", bits=8)
    x, y = batch
    model(x)  # outside a transform it runs
    with pytest.raises(ValueError, match="8-bit layer .* cannot run inside a torch.func transform"):
        grad(loss_of(model))(trainable(model), x[0], y[0])


@pytest.mark.parametrize(("stored", "compute", "quant_type", "nested", "bias"), [
    (torch.float32, torch.float32, "fp4", False, False),
    (torch.float16, torch.float32, "nf4", True, True),  # transformers' default for torch_dtype=float16
    (torch.bfloat16, torch.float32, "nf4", False, True),
    (torch.bfloat16, torch.bfloat16, "nf4", True, True),
    (torch.float32, None, "nf4", True, True),  # compute dtype taken from the input, as bitsandbytes does
])
def test_the_plain_path_gives_bitsandbytes_values_bit_for_bit(stored, compute, quant_type, nested, bias):
    """Weights stored in one dtype and computed in another are decoded straight into the compute dtype, as
    bitsandbytes' matmul does (a decode into the stored dtype and a cast after would round twice)."""
    torch.manual_seed(0)
    layer = bnb_linear(64, 96, 4, stored, compute, quant_type, nested, bias).train()
    x = torch.randn(3, 5, 64, dtype=compute or torch.float32, requires_grad=True)
    want = layer(x)
    with forward_ad.dual_level():  # a transform is active: the plain path
        got = call_base_layer(layer, x)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_frozen_weight_passed_to_functional_call_is_a_clear_error(batch):
    """Frozen parameters handed to functional_call as plain tensors: a 4-bit weight loses its quantization state."""
    model = adapted("lora")
    x, y = batch
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}

    def loss(params, xb, yb):
        out = functional_call(model, (params, frozen), (xb.unsqueeze(0),))
        return F.cross_entropy(out, yb.unsqueeze(0))

    with pytest.raises(ValueError, match="pass functional_call only the trainable parameters"):
        grad(loss)(trainable(model), x[0], y[0])


def test_a_bitsandbytes_layer_left_out_of_the_adapter_still_fails(batch):
    """Documented limit: only adapted layers take the plain path, so every bitsandbytes layer must be a target."""
    torch.manual_seed(0)
    model = quiet(dt.get_peft_model, MLP(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["up"]))
    x, y = batch
    with pytest.raises(RuntimeError):
        grad(loss_of(model))(trainable(model), x[0], y[0])
