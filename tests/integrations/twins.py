"""Twin models for side-by-side tests: the same tiny base and the same adapter, wrapped by deltatune and by HF PEFT."""

from __future__ import annotations

import os

import datasets
import peft
import torch
from transformers import TrainingArguments

import deltatune


def twins(make_base, config: deltatune.LoraConfig, tmp_path, seed: int = 0):
    """(deltatune model, PEFT model) with equal base weights and equal initial adapter (PEFT loads deltatune's file)."""
    torch.manual_seed(seed)
    ours = deltatune.get_peft_model(make_base(), config)
    with torch.no_grad():  # B != 0, so the adapter matters from the first step
        generator = torch.Generator().manual_seed(seed + 1)
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    initial = os.path.join(tmp_path, "initial")
    ours.save_pretrained(initial)
    torch.manual_seed(seed)
    theirs = peft.PeftModel.from_pretrained(make_base(), initial, is_trainable=True)
    return ours, theirs


def token_dataset(n: int = 24, length: int = 10, vocab: int = 96, seed: int = 0, **extra_columns) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=generator)
    columns = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    for name, make in extra_columns.items():
        columns[name] = make(ids, generator)
    return datasets.Dataset.from_dict(columns)


def arguments(output_dir, **overrides) -> TrainingArguments:
    """TrainingArguments at their defaults, but for what a seconds-long test needs (no reporting, few steps)."""
    settings = dict(max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2,
                    report_to="none", save_steps=2, eval_strategy="steps", eval_steps=2, logging_steps=1,
                    dataloader_num_workers=0, seed=0)
    settings.update(overrides)
    return TrainingArguments(output_dir=str(output_dir), **settings)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def eval_losses(trainer) -> list[float]:
    return [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
