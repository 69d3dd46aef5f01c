"""deltatune train's bf16 runs store the frozen linear weights LoRA wraps in bf16: the same products as autocast."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.methods.lora import LoraLayer
from deltatune.train.trainer import frozen_linear_weights_in
from tests.conftest import make_model, model_inputs, perturb


def _step(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_frozen_weights_give_autocasts_loss_and_gradients_bit_for_bit(dropout):
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                 target_modules="all-linear"))
    perturb(model)
    cast = copy.deepcopy(model)
    converted = frozen_linear_weights_in(cast, torch.bfloat16)
    layers = [m for m in cast.modules() if isinstance(m, LoraLayer)]
    assert converted == len(layers) > 0
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in layers)
    assert all(p.dtype == torch.float32 for p in cast.parameters() if p.requires_grad)  # the adapter stays fp32
    assert cast.get_input_embeddings().weight.dtype == torch.float32
    inputs = model_inputs("llama")
    torch.manual_seed(0)
    loss, grads = _step(model, inputs)
    torch.manual_seed(0)
    cast_loss, cast_grads = _step(cast, inputs)
    assert torch.equal(loss, cast_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, cast_grads[name]), name


def test_tied_and_trainable_weights_are_left_alone():
    model = make_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    peft_model = dt.get_peft_model(model, dt.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    frozen_linear_weights_in(peft_model, torch.bfloat16)
    assert peft_model.get_input_embeddings().weight.dtype == torch.float32  # lm_head shares it
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
    assert peft_model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


def test_a_bf16_run_trains_and_scores_on_bf16_frozen_weights(tmp_path, monkeypatch):
    from deltatune.train import run as runmod
    from deltatune.train.config import TrainConfig
    from tests.train.tiny import alpaca_rows, make_tiny_model_dir, write_jsonl

    converted = []
    original = runmod.frozen_linear_weights_in
    monkeypatch.setattr(runmod, "frozen_linear_weights_in",
                        lambda model, dtype: converted.append(original(model, dtype)) or converted[-1])
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    data = write_jsonl(str(tmp_path / "data.jsonl"), alpaca_rows(24))
    summary = runmod.train(TrainConfig(model=model_dir, data=data, output=str(tmp_path / "run"), max_steps=2,
                                       batch_size=4, eval_size=4, precision="bf16", threads=1))
    assert converted and converted[0] > 0
    assert summary.steps == 2 and summary.exact_match_after is not None
    fp32 = runmod.train(TrainConfig(model=model_dir, data=data, output=str(tmp_path / "fp32"), max_steps=2,
                                    batch_size=4, eval_size=4, precision="fp32", threads=1))
    assert len(converted) == 1 and fp32.steps == 2  # fp32 runs keep their weights
