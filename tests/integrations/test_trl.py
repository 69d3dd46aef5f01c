"""TRL's SFTTrainer and DPOTrainer with deltatune, side by side with HF PEFT on a tiny Llama.

Both ways TRL takes an adapter: ``model=<PeftModel>`` and ``peft_config=<LoraConfig>``. For DPO with
``ref_model=None`` the reference is the model itself with a frozen copy of the adapter (TRL's "ref"
adapter), so no second copy of the base model is loaded.
"""

from __future__ import annotations

import os
import warnings

import datasets
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune

from ..train.tiny import tiny_tokenizer

trl = pytest.importorskip("trl")
warnings.filterwarnings("ignore", category=UserWarning)

TOKENIZER = tiny_tokenizer()
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")


def tiny_chat_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=TOKENIZER.pad_token_id,
                         eos_token_id=TOKENIZER.eos_token_id, bos_token_id=TOKENIZER.bos_token_id)
    return LlamaForCausalLM(config)


def sft_data() -> datasets.Dataset:
    words = ["red", "blue", "green", "gold"]
    return datasets.Dataset.from_dict({"prompt": [f"Say {w}: " for w in words * 3],
                                       "completion": [w for w in words * 3]})


def dpo_data() -> datasets.Dataset:
    words = ["red", "blue", "green", "gold"]
    return datasets.Dataset.from_dict({"prompt": [f"Say {w}: " for w in words * 3],
                                       "chosen": [w for w in words * 3],
                                       "rejected": [w[::-1] for w in words * 3]})


def common(output_dir) -> dict:
    return dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=0.05,
                optim="sgd", logging_steps=1, save_steps=3, report_to="none", seed=0, max_length=48,
                dataloader_num_workers=0, bf16=False)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def same_initial_adapter(tmp_path):
    """(deltatune model, PEFT model): equal base, PEFT loads deltatune's initial adapter (B != 0)."""
    ours = deltatune.get_peft_model(tiny_chat_llama(), deltatune.LoraConfig(**LORA))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    ours.save_pretrained(tmp_path / "initial")
    theirs = peft.PeftModel.from_pretrained(tiny_chat_llama(), str(tmp_path / "initial"), is_trainable=True)
    return ours, theirs


def assert_same_adapter_files(folder_a, folder_b) -> None:
    a = load_file(os.path.join(folder_a, "adapter_model.safetensors"))
    b = load_file(os.path.join(folder_b, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_sft_trainer_with_a_deltatune_model_matches_peft(tmp_path):
    ours, theirs = same_initial_adapter(tmp_path)
    runs = {}
    for name, model in (("ours", ours), ("peft", theirs)):
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common(tmp_path / name)),
                                 train_dataset=sft_data(), processing_class=TOKENIZER)
        trainer.train()
        runs[name] = trainer
    torch.testing.assert_close(losses(runs["ours"]), losses(runs["peft"]), rtol=1e-4, atol=1e-5)
    assert losses(runs["ours"])[0] != losses(runs["ours"])[-1]
    assert_same_adapter_files(tmp_path / "ours" / "checkpoint-3", tmp_path / "peft" / "checkpoint-3")
    assert "model.safetensors" not in os.listdir(tmp_path / "ours" / "checkpoint-3")


def test_sft_trainer_takes_a_deltatune_lora_config(tmp_path):
    """``peft_config=deltatune.LoraConfig``: TRL trains a deltatune adapter, equal to PEFT's from the same seed."""
    runs = {}
    for name, config in (("ours", deltatune.LoraConfig(**LORA)), ("peft", peft.LoraConfig(**LORA))):
        trainer = trl.SFTTrainer(model=tiny_chat_llama(), args=trl.SFTConfig(**common(tmp_path / name)),
                                 train_dataset=sft_data(), processing_class=TOKENIZER, peft_config=config)
        trainer.train()
        runs[name] = trainer
    assert isinstance(runs["ours"].model, deltatune.PeftModelForCausalLM)
    assert isinstance(runs["peft"].model, peft.PeftModelForCausalLM)
    # the adapter's initial A comes from the same seeded draws in both libraries, so the runs agree
    torch.testing.assert_close(losses(runs["ours"]), losses(runs["peft"]), rtol=1e-4, atol=1e-5)
    assert_same_adapter_files(tmp_path / "ours" / "checkpoint-3", tmp_path / "peft" / "checkpoint-3")


def dpo_config(output_dir) -> trl.DPOConfig:
    return trl.DPOConfig(**common(output_dir), beta=0.1)


def test_dpo_trainer_with_a_deltatune_model_and_no_reference_model(tmp_path):
    ours, theirs = same_initial_adapter(tmp_path)
    runs = {}
    for name, model in (("ours", ours), ("peft", theirs)):
        trainer = trl.DPOTrainer(model=model, ref_model=None, args=dpo_config(tmp_path / name),
                                 train_dataset=dpo_data(), processing_class=TOKENIZER)
        trainer.train()
        runs[name] = trainer
    assert runs["ours"].ref_model is None  # no second copy of the base model
    assert sorted(ours.peft_config) == ["default", "ref"]  # TRL's frozen copy of the adapter is the reference
    first = losses(runs["ours"])[0]
    assert abs(first - torch.log(torch.tensor(2.0)).item()) < 1e-4  # policy == reference at step 1
    torch.testing.assert_close(losses(runs["ours"]), losses(runs["peft"]), rtol=1e-4, atol=1e-5)
    assert losses(runs["ours"])[-1] != first
    ref = {n: p for n, p in ours.named_parameters() if ".ref." in n}
    assert ref and not any(p.requires_grad for p in ref.values())
    assert_same_adapter_files(tmp_path / "ours" / "checkpoint-3", tmp_path / "peft" / "checkpoint-3")


def test_dpo_trainer_takes_a_deltatune_lora_config(tmp_path):
    runs = {}
    for name, config in (("ours", deltatune.LoraConfig(**LORA)), ("peft", peft.LoraConfig(**LORA))):
        trainer = trl.DPOTrainer(model=tiny_chat_llama(), ref_model=None, args=dpo_config(tmp_path / name),
                                 train_dataset=dpo_data(), processing_class=TOKENIZER, peft_config=config)
        trainer.train()
        runs[name] = trainer
    assert isinstance(runs["ours"].model, deltatune.PeftModel)
    assert runs["ours"].ref_model is None
    torch.testing.assert_close(losses(runs["ours"]), losses(runs["peft"]), rtol=1e-4, atol=1e-5)
