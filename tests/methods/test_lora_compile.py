"""``torch.compile`` of a model with LoRA / DoRA layers: one graph, as PEFT's, and the eager gradients.

Before 2026-12-03 the input-rebuild check read ``x.grad_fn`` while dynamo traced, which broke the graph at every
adapted layer (25 breaks on the tiny Llama, 43 with DoRA, whose norm and kept-output checks are data-dependent); each
layer's forward then compiled on its own, once per shape, until dynamo's recompile limit sent the rest to eager;
sparse dropout broke it too, and an NF4 base's decode (buffers written through ``out=``) failed to trace at all.
"""

from __future__ import annotations

import pytest
import torch

from deltatune import LoraConfig, get_peft_model
from deltatune.quant import quantize_model
from tests.conftest import make_model, model_inputs, perturb, quiet


def adapted_llama(use_dora: bool, quantized: bool = False, dropout: float = 0.0) -> torch.nn.Module:
    base = make_model("llama")
    if quantized:
        base = quantize_model(base, bits=4)
    model = quiet(get_peft_model, base,
                  LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora, lora_dropout=dropout))
    perturb(model)
    return model.train()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(("use_dora", "quantized", "dropout"),
                         [(False, False, 0.0), (True, False, 0.0), (False, True, 0.0), (False, False, 0.1)])
def test_a_training_forward_traces_as_one_graph(use_dora, quantized, dropout):
    """LoRA, DoRA, LoRA on an NF4 base (its decode in plain ops while tracing) and with sparse dropout (F.dropout)."""
    model = adapted_llama(use_dora, quantized, dropout)
    ids = model_inputs("llama")["input_ids"]
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize(("use_dora", "quantized"), [(False, False), (True, False), (False, True)])
def test_compiled_gradients_equal_eager(use_dora, quantized):
    model = adapted_llama(use_dora, quantized)
    ids = model_inputs("llama")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager[name], atol=1e-6, rtol=1e-5, msg=name)
