"""A base loaded in 4 or 8 bits by transformers + bitsandbytes, trained with plain ``transformers.Trainer``.

Side by side with HF PEFT: the same quantized base, the same initial adapter, the same losses and the
same parameter counts (PEFT counts a packed 4-bit weight as its unpacked number of values).
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer

import deltatune

from .twins import arguments, losses, token_dataset

pytest.importorskip("bitsandbytes")

QUANTIZATION = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bnb_base")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def quantized(base_dir, kind: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**QUANTIZATION[kind]))


@pytest.mark.parametrize("kind", list(QUANTIZATION))
def test_trainer_on_a_bitsandbytes_base_matches_peft(kind, base_dir, tmp_path):
    lora = dict(task_type="CAUSAL_LM", target_modules="all-linear", r=4, lora_alpha=8)
    ours = deltatune.get_peft_model(deltatune.prepare_model_for_kbit_training(quantized(base_dir, kind)),
                                    deltatune.LoraConfig(**lora))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    ours.save_pretrained(tmp_path / "initial")
    theirs = peft.PeftModel.from_pretrained(peft.prepare_model_for_kbit_training(quantized(base_dir, kind)),
                                            str(tmp_path / "initial"), is_trainable=True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    data = token_dataset(labels=lambda ids, g: ids.tolist())
    runs = {}
    for name, model in (("ours", ours), ("peft", theirs)):
        trainer = Trainer(model=model, args=arguments(tmp_path / name, eval_strategy="no", optim="sgd",
                                                      learning_rate=0.2), train_dataset=data)
        trainer.train()  # no "cannot perform fine-tuning on purely quantized models"
        runs[name] = trainer
    torch.testing.assert_close(losses(runs["ours"]), losses(runs["peft"]), rtol=1e-4, atol=1e-5)
    assert losses(runs["ours"])[0] != losses(runs["ours"])[-1]
