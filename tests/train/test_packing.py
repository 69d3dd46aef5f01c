"""deltatune train --packing: padding-free batches give the padded batches' losses and adapter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

import deltatune as dt
from deltatune.train import run as runmod
from deltatune.train.config import TrainConfig
from deltatune.train.trainer import (
    AdapterTrainer,
    Collator,
    ListDataset,
    PackingCollator,
    packing_keeps_rows_apart,
)
from tests.conftest import make_model, quiet

from .tiny import alpaca_rows, make_tiny_model_dir, write_jsonl


def rows(n: int = 8) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 5 + (3 * i) % 7  # unequal lengths: padding to remove
        ids = torch.randint(2, 96, (length,), generator=generator).tolist()
        labels = [-100] * 3 + ids[3:]
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return out


def test_packing_collator_joins_rows_with_restarting_positions():
    batch = PackingCollator()(rows(2))
    assert batch["input_ids"].shape == (1, 5 + 8)
    assert batch["position_ids"].tolist() == [list(range(5)) + list(range(8))]
    assert batch["labels"][0, 5].item() == -100  # the second row's first label: never predicted from the first row
    assert "attention_mask" not in batch


def train(kind: str, collator, label_positions_loss: bool, tmp_path) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = quiet(dt.get_peft_model, make_model(kind), dt.LoraConfig(r=4, target_modules="all-linear",
                                                                     init_lora_weights=False))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=ListDataset(rows(16)), data_collator=collator)
    trainer.label_positions_loss = label_positions_loss
    quiet(trainer.train)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # (GPT-2's dropout would draw other masks for other shapes)
@pytest.mark.parametrize("label_positions_loss", [True, False])
def test_packed_steps_equal_padded_steps(tmp_path, kind, label_positions_loss):
    padded = train(kind, Collator(0), label_positions_loss, tmp_path / "padded")
    packed = train(kind, PackingCollator(), label_positions_loss, tmp_path / "packed")
    assert len(packed[0]) == 2 and packed[0] == pytest.approx(padded[0], rel=1e-5)
    for key, value in padded[1].items():
        assert torch.allclose(packed[1][key], value, atol=1e-5), key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: the check runs before the weights go to bf16
def test_packing_run_and_its_refusal_for_prompt_methods(tmp_path, precision):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    data = write_jsonl(str(tmp_path / "data.jsonl"), alpaca_rows(16))
    summary = runmod.train(TrainConfig(model=model_dir, data=data, output=str(tmp_path / "run"), max_steps=3,
                                       batch_size=4, eval_size=0, precision=precision, threads=1, packing=True))
    assert summary.steps == 3 and (tmp_path / "run" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="needs padded batches"):
        TrainConfig(model=model_dir, data=data, method="prompt", packing=True)


class _MixesRows(torch.nn.Module):
    """A stand-in for an attention that ignores restarting position ids: every position sees all before it."""

    def forward(self, input_ids, position_ids=None, use_cache=None):  # noqa: ANN001, ANN201
        return SimpleNamespace(logits=input_ids.float().cumsum(-1).unsqueeze(-1))


def test_models_whose_attention_mixes_packed_rows_are_found():
    for kind in ("llama", "qwen2", "gpt2"):
        assert packing_keeps_rows_apart(make_model(kind)), kind
    assert not packing_keeps_rows_apart(_MixesRows())


def test_packing_is_refused_for_a_model_that_mixes_rows(tmp_path, monkeypatch):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    data = write_jsonl(str(tmp_path / "data.jsonl"), alpaca_rows(8))
    monkeypatch.setattr(runmod, "packing_keeps_rows_apart", lambda model: False)
    with pytest.raises(ValueError, match="does not keep packed rows apart"):
        runmod.train(TrainConfig(model=model_dir, data=data, output=str(tmp_path / "run"), max_steps=2,
                                 eval_size=0, precision="fp32", threads=1, packing=True))
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
