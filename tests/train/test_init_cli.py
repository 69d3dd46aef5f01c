"""deltatune train --init pissa|olora|loftq: the written adapter rebuilds the model that trained."""

from __future__ import annotations

import pytest
import torch

from deltatune import LoraConfig
from deltatune.methods.lora_init import pissa_factors
from deltatune.quant import Linear4bit, Linear8bit
from deltatune.train import run as runmod
from deltatune.train.config import TrainConfig
from deltatune.train.infer import load_adapted

from .tiny import alpaca_rows, make_tiny_model_dir, write_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-init")
    return make_tiny_model_dir(str(root / "model")), write_jsonl(str(root / "data.jsonl"), alpaca_rows(24))


def train_keeping_model(tiny, output, monkeypatch, init, **kwargs):
    """Run ``deltatune train``; returns the in-memory model as it was when the adapter was written."""
    kept = {}
    real = runmod._save_adapter

    def keep(peft_model, *args, **kw):
        kept["model"] = peft_model
        return real(peft_model, *args, **kw)

    monkeypatch.setattr(runmod, "_save_adapter", keep)
    model_dir, data = tiny
    runmod.train(TrainConfig(model=model_dir, data=data, output=str(output), max_steps=4, batch_size=4, lr=5e-2,
                             eval_size=0, precision="fp32", threads=1, r=4, options={"init": init}, **kwargs))
    return kept["model"]


def same_outputs(trained, output) -> None:
    loaded, _ = load_adapted(str(output))
    trained.eval()  # (the run leaves it in training mode: dropout)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4)
    return loaded


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_pissa_and_olora_runs_write_plain_lora_for_the_original_base(tiny, tmp_path, monkeypatch, init):
    trained = train_keeping_model(tiny, tmp_path / "run", monkeypatch, init=init)
    saved = LoraConfig.from_pretrained(tmp_path / "run")
    assert saved.init_lora_weights is True and saved.r == 8  # [trained; initial] stacked
    loaded = same_outputs(trained, tmp_path / "run")
    if init == "pissa":  # the initial half is PiSSA's factors of the original weight
        layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
        a0, b0 = pissa_factors(layer.base_layer.weight.detach(), 4, layer.scaling["default"])
        assert torch.allclose(layer.lora_A["default"].weight[4:], a0, atol=1e-5)
        assert torch.allclose(layer.lora_B["default"].weight[:, 4:], -b0, atol=1e-5)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_loftq_run_quantizes_the_base_and_reloads_it(tiny, tmp_path, monkeypatch, quantize):
    trained = train_keeping_model(tiny, tmp_path / "run", monkeypatch, init="loftq", quantize=quantize)
    kind = Linear4bit if quantize == "nf4" else Linear8bit
    adapted = [m for m in trained.modules() if hasattr(m, "lora_A")]
    assert adapted and all(isinstance(m.base_layer, kind) for m in adapted)
    plain = [m for n, m in trained.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n
             and not n.endswith("lm_head")]
    assert not plain  # every other linear layer is quantized as --quantize does
    saved = LoraConfig.from_pretrained(tmp_path / "run")
    assert saved.init_lora_weights == "loftq" and saved.loftq_config["loftq_bits"] == (4 if quantize == "nf4" else 8)
    same_outputs(trained, tmp_path / "run")


@pytest.mark.parametrize("init,quantize,message", [
    ("loftq", None, "add --quantize nf4"),
    ("loftq", "fp4", "not fp4"),
    ("pissa", "nf4", "cannot be combined with --quantize"),
    ("kaiming", None, "is not a valid value"),
])
def test_bad_init_flags_are_refused_before_loading(tiny, tmp_path, init, quantize, message):
    model_dir, data = tiny
    with pytest.raises(ValueError, match=message):
        runmod.train(TrainConfig(model=model_dir, data=data, output=str(tmp_path / "run"), quantize=quantize,
                                 options={"init": init}))
    assert not (tmp_path / "run").exists()
