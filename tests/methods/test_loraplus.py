"""LoRA+ (``deltatune.create_loraplus_optimizer`` and ``deltatune train --loraplus-ratio``), with PEFT's
``create_loraplus_optimizer`` as the oracle: the same parameters in the same groups, with the same learning rates
and weight decays, on the same model structure."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import deltatune
from deltatune import cli
from deltatune.train import trainer as trainer_mod
from deltatune.train.config import TrainConfig, config_from_sources

from ..conftest import make_model, model_inputs
from ..train.tiny import alpaca_rows, make_tiny_model_dir, write_jsonl

# (name, model kind, LoraConfig kwargs, create_loraplus_optimizer kwargs)
CASES = [
    ("llama_q_v", "llama", {"target_modules": ["q_proj", "v_proj"]}, {}),
    ("embedding_and_head", "llama", {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
     {"loraplus_lr_embedding": 3e-5, "loraplus_weight_decay": 0.1}),
    ("gpt2_biases_and_layernorm", "gpt2", {"target_modules": ["c_attn", "wte"], "bias": "all",
                                           "modules_to_save": ["ln_f"]}, {"loraplus_weight_decay": 0.01}),
    ("bert_classifier_lora_only_bias", "bert", {"target_modules": ["query", "value"], "bias": "lora_only",
                                                "task_type": "SEQ_CLS"}, {"eps": 1e-6, "betas": (0.8, 0.9)}),
]


def _groups(optimizer, model):
    """Each group as (sorted parameter names, its settings without the parameters)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), {k: v for k, v in g.items() if k != "params"})
            for g in optimizer.param_groups]


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize(("name", "kind", "config", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_parameter_groups_equal_peft(name, kind, config, kwargs, optimizer_cls):
    if optimizer_cls is torch.optim.SGD:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("eps", "betas")} | {"momentum": 0.9}
    ours = deltatune.get_peft_model(make_model(kind), deltatune.LoraConfig(**config))
    theirs = peft.get_peft_model(make_model(kind), peft.LoraConfig(**config))
    mine = deltatune.create_loraplus_optimizer(ours, optimizer_cls, lr=2e-4, loraplus_lr_ratio=16, **dict(kwargs))
    expected = peft_loraplus(theirs, optimizer_cls, lr=2e-4, loraplus_lr_ratio=16, **dict(kwargs))
    assert type(mine) is type(expected)
    assert _groups(mine, ours) == _groups(expected, theirs)
    assert mine.defaults == expected.defaults
    grouped = sum(len(g["params"]) for g in mine.param_groups)
    assert grouped == sum(p.requires_grad for p in ours.parameters())  # every trainable parameter, once


def test_b_trains_ratio_times_faster_than_a():
    """One SGD step: each A moves by lr x its gradient, each B by lr x ratio x its gradient."""
    model = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(
        target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    optimizer = deltatune.create_loraplus_optimizer(model, torch.optim.SGD, lr=0.01, loraplus_lr_ratio=8)
    inputs = model_inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr = 0.01 * (8 if "lora_B" in name else 1)
            assert torch.allclose(before[name] - param.detach(), lr * grads[name], atol=1e-7), name


def test_signature_takes_peft_arguments():
    import inspect

    theirs = inspect.signature(peft_loraplus).parameters
    ours = inspect.signature(deltatune.create_loraplus_optimizer).parameters
    assert list(theirs) == list(ours)


@pytest.mark.parametrize(("lr", "ratio"), [(0.0, 16), (1e-3, float("nan")), (1e-3, -2), (1e-3, "16")])
def test_bad_learning_rates_are_refused(lr, ratio):
    model = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="positive finite number"):
        deltatune.create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)


# ---- deltatune train --loraplus-ratio -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loraplus")
    return make_tiny_model_dir(str(root / "model")), write_jsonl(str(root / "data.jsonl"), alpaca_rows(16))


RUN = ["--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--lr", "0.001", "--precision", "fp32",
       "--threads", "1", "--eval-size", "0", "--r", "4", "--target-modules", "q_proj,v_proj,embed_tokens"]


def _record_optimizers(monkeypatch):
    """Capture each optimizer Trainer makes: its class and, per group, (parameter names, lr, weight decay)."""
    made = []
    original = trainer_mod.AdapterTrainer.create_optimizer

    def create_optimizer(self, model=None):
        optimizer = original(self, model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        made.append((type(optimizer), [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
                                       for g in optimizer.param_groups]))
        return optimizer

    monkeypatch.setattr(trainer_mod.AdapterTrainer, "create_optimizer", create_optimizer)
    return made


def test_train_with_loraplus_ratio_gives_b_the_ratio_times_lr(tiny, tmp_path, monkeypatch, capsys):
    model_dir, data = tiny
    made = _record_optimizers(monkeypatch)
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "plain"), *RUN]) == 0
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "plus"), *RUN,
                     "--loraplus-ratio", "16"]) == 0
    assert "LoRA+ ratio 16" in capsys.readouterr().out
    (plain_cls, plain_groups), (plus_cls, plus_groups) = made
    assert plus_cls is plain_cls  # Trainer's own optimizer, only grouped differently
    assert [(lr, wd) for _, lr, wd in plus_groups] == [(1e-3, 0.0), (1e-6, 0.0), (16e-3, 0.0), (16e-3, 0.0)]
    a_group, embedding_group, b_group, _ = (names for names, _, _ in plus_groups)
    assert a_group and all("lora_A" in n for n in a_group)
    assert embedding_group and all("embed_tokens" in n for n in embedding_group)
    assert b_group and all("lora_B" in n and "embed_tokens" not in n for n in b_group)
    assert sorted(n for names, _, _ in plus_groups for n in names) == sorted(n for names, _, _ in plain_groups
                                                                           for n in names)


def test_loraplus_ratio_in_a_yaml_file_and_its_checks(tiny, tmp_path):
    model_dir, data = tiny
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {model_dir}\ndata: {data}\nloraplus_ratio: 4\n")
    assert config_from_sources(str(path), {}).loraplus_ratio == 4
    for kwargs, words in [({"method": "ia3"}, "--method lora"), ({"loraplus_ratio": 0}, "must be > 0"),
                          ({"loraplus_ratio": float("inf")}, "finite"), ({"loraplus_ratio": "16"}, "number")]:
        with pytest.raises(ValueError, match=words):
            TrainConfig(**{"loraplus_ratio": 16, **kwargs})


def test_train_refuses_loraplus_for_another_method_in_one_line(tiny, tmp_path, capsys):
    model_dir, data = tiny
    code = cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "x"), "--method", "ia3",
                     "--loraplus-ratio", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "--method lora" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
