"""torch.func transforms and forward-mode AD through deltatune's models (``func_transforms.py``).

The fused LoRA / DoRA training nodes, sparse dropout, the chunked loss and a quantized layer's backward are custom
autograd Functions, which ``torch.func`` and forward-mode AD cannot go through; inside one those paths take plain
ops. Each test computes a gradient both ways, with the transform and with the regular backward (which takes the
fast paths), or against PEFT, and compares the values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jvp, vmap

from deltatune import LoraConfig, causal_lm_loss, get_peft_model, sparse_dropout
from deltatune.methods.lora import LoraLayer
from deltatune.quant import Linear4bit, quantize_model
from tests.conftest import make_model, model_inputs, perturb, quiet

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.mid = nn.Linear(32, 32)
        self.down = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.mid(F.gelu(self.up(x)))))


def adapted(library, use_dora: bool = False, quantized: bool = False, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    base = MLP()
    if quantized:
        base = quantize_model(base, bits=4)
        assert isinstance(base.mid, Linear4bit)
    config = library.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid", "down"], use_dora=use_dora,
                                lora_dropout=dropout)
    model = quiet(library.get_peft_model, base, config)
    perturb(model)
    return model.train()


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def per_sample_by_vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    def loss(params, xb, yb):
        return F.cross_entropy(functional_call(model, params, (xb.unsqueeze(0),)), yb.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(trainable(model), x, y)


def per_sample_by_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in trainable(model)}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                grads[name].append(param.grad.clone())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(g) for name, g in grads.items()}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4, msg=name)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(6, 16, generator=generator), torch.randint(0, 3, (6,), generator=generator)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_per_sample_gradients_by_vmap_equal_the_fused_backward_sample_by_sample(batch, use_dora, quantized):
    import deltatune

    model = adapted(deltatune, use_dora=use_dora, quantized=quantized)
    layer = model.base_model.model.mid
    assert isinstance(layer, LoraLayer) and layer._fused_call(batch[0]) is not None  # the loop takes the fused node
    assert_close(per_sample_by_vmap(model, *batch), per_sample_by_loop(model, *batch))


def synced(use_dora: bool = False) -> dict[str, nn.Module]:
    """deltatune's and PEFT's adapted MLP holding the same adapter values."""
    import deltatune

    ours, theirs = adapted(deltatune, use_dora=use_dora), adapted(peft, use_dora=use_dora)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(dict(ours.named_parameters())[name])
    return {"deltatune": ours, "peft": theirs}


@pytest.mark.parametrize("use_dora", [False, True])
def test_per_sample_gradients_equal_peft(batch, use_dora):
    models = synced(use_dora)
    got, want = per_sample_by_vmap(models["deltatune"], *batch), per_sample_by_vmap(models["peft"], *batch)
    assert got["base_model.model.mid.lora_A.default.weight"].abs().max() > 1e-3  # a gradient worth comparing
    assert_close(got, want)


def test_jvp_and_forward_ad_equal_peft(batch):
    """Forward-mode derivatives in training mode with grad enabled, where the fused node would otherwise run."""
    x = batch[0]
    tangent_in = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    outputs = {}
    for name, model in synced().items():
        params = trainable(model)
        tangents = {key: torch.randn(p.shape, generator=torch.Generator().manual_seed(len(key))) for key, p in
                    params.items()}
        _, by_func = jvp(lambda p, m=model: functional_call(m, p, (x,)), (params,), (tangents,))
        with forward_ad.dual_level():
            by_dual = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent_in))).tangent
        outputs[name] = (by_func, by_dual)
    assert outputs["deltatune"][0].abs().max() > 1e-3 and outputs["deltatune"][1].abs().max() > 1e-3
    torch.testing.assert_close(outputs["deltatune"][0], outputs["peft"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs["deltatune"][1], outputs["peft"][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_grad_of_a_causal_lm_equals_its_backward(use_dora):
    """A tiny Llama, all linear layers: the regular backward takes the fused nodes and rebuilds their inputs."""
    model = make_model("llama")
    model = quiet(get_peft_model, model, LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora))
    perturb(model)
    model.train()
    ids = model_inputs("llama")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    got = grad(lambda p: functional_call(model, p, (), {"input_ids": ids, "labels": ids}).loss)(trainable(model))
    assert_close(got, want)


def test_sparse_dropout_under_grad_drops_a_fraction_p():
    x = torch.ones(20000)
    p = 0.1
    g = grad(lambda t: sparse_dropout(t, p).sum())(x)
    kept = g != 0
    torch.testing.assert_close(g[kept], torch.full_like(g[kept], 1 / (1 - p)))
    assert 0.085 < 1 - kept.float().mean().item() < 0.115  # 20000 draws: 0.1 +- 0.002 per standard deviation


def test_causal_lm_loss_under_grad_equals_its_backward():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 8, generator=generator)
    head = nn.Linear(8, 11)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    labels[0, :3] = -100
    want = torch.autograd.grad(causal_lm_loss(hidden.requires_grad_(), head, labels, chunk_size=2), hidden)[0]
    got = grad(lambda h: causal_lm_loss(h, head, labels, chunk_size=2))(hidden.detach())
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(got, want)
