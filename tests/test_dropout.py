"""SparseDropout draws Bernoulli(p) masks as geometric gaps: the same distribution as nn.Dropout, checked here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.dropout import SparseDropout, dropped_positions, sparse_dropout

CPU = torch.device("cpu")


@pytest.mark.parametrize("p", [0.01, 0.05, 0.2, 0.5])
def test_the_dropped_fraction_is_p(p):
    n = 2_000_000
    positions = dropped_positions(n, p, CPU)
    assert positions.unique().numel() == positions.numel() and int(positions.min()) >= 0 and int(positions.max()) < n
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(positions.numel() - n * p) < 5 * sigma


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_every_position_is_dropped_with_probability_p_independently(p):
    """Per position over many draws (no position favoured, the first and last included) and pairs of neighbours
    (dropped together with probability p^2: no correlation between adjacent elements)."""
    width, draws = 50, 20_000
    counts = torch.zeros(width)
    pairs = 0
    for _ in range(draws):
        mask = torch.zeros(width, dtype=torch.bool)
        mask[dropped_positions(width, p, CPU)] = True
        counts += mask
        pairs += int((mask[:-1] & mask[1:]).sum())
    sigma = math.sqrt(draws * p * (1 - p))
    assert float((counts - draws * p).abs().max()) < 5 * sigma
    expected_pairs = draws * (width - 1) * p * p
    assert abs(pairs - expected_pairs) < 6 * math.sqrt(expected_pairs)


def test_the_gaps_are_geometric():
    p = 0.1
    positions = dropped_positions(1_000_000, p, CPU)
    gaps = torch.diff(positions)
    for k in (1, 2, 5, 10):  # P(gap = k) = (1 - p)^(k - 1) p
        expected = (1 - p) ** (k - 1) * p
        observed = float((gaps == k).float().mean())
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / gaps.numel()), k


def test_forward_scales_kept_elements_and_backward_uses_the_same_mask():
    torch.manual_seed(0)
    x = (torch.rand(64, 300) + 0.5).requires_grad_()
    out = sparse_dropout(x, 0.2)
    kept = out != 0
    assert torch.allclose(out[kept], x.detach()[kept] / 0.8)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.allclose(x.grad, torch.where(kept, grad / 0.8, torch.zeros_like(grad)))
    assert 0.15 < 1 - kept.float().mean().item() < 0.25


def test_seeded_masks_repeat_and_modes_match_nn_dropout():
    x = torch.randn(8, 40)
    torch.manual_seed(3)
    first = sparse_dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(first, sparse_dropout(x, 0.1))
    layer = SparseDropout(0.1)
    assert isinstance(layer, nn.Dropout)
    assert torch.equal(layer.eval()(x), x)  # eval: identity
    assert torch.equal(sparse_dropout(x, 0.0), x)
    torch.manual_seed(1)
    high = sparse_dropout(x, 0.8)  # above 0.5 it is nn.Dropout's own path
    torch.manual_seed(1)
    assert torch.equal(high, nn.functional.dropout(x, 0.8, True))
    assert sparse_dropout(torch.empty(0, 4), 0.1).shape == (0, 4)
    assert torch.equal(sparse_dropout(torch.ones(3, 3), 1.0), torch.zeros(3, 3))


def test_non_contiguous_input():
    x = torch.randn(30, 20).t()
    torch.manual_seed(0)
    out = sparse_dropout(x, 0.3)
    kept = out != 0
    assert out.shape == x.shape and torch.allclose(out[kept], x[kept] / 0.7)


def test_lora_uses_it():
    model = dt.get_peft_model(nn.Sequential(nn.Linear(8, 8)), dt.LoraConfig(r=2, lora_dropout=0.1,
                                                                            target_modules=["0"]))
    layer = model.base_model.model[0]
    assert isinstance(layer.lora_dropout["default"], SparseDropout)


def test_under_torch_compile_it_is_f_dropout_in_one_graph():
    """A trace cannot go through the Function and its data-dependent draw (fullgraph=True raises on a graph break)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: sparse_dropout(t, 0.1), backend="aot_eager", fullgraph=True)
    out = compiled(torch.ones(20000))
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.9))
    assert 0.085 < 1 - kept.float().mean().item() < 0.115
    torch._dynamo.reset()
