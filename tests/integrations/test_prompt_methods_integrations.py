"""Prompt tuning, P-tuning and prefix tuning with TRL's SFTTrainer, on a bitsandbytes base and on deltatune's own
4/8-bit base; side by side with HF PEFT where PEFT can run the same thing.

Both ways TRL takes an adapter (``peft_config=<deltatune config>`` and ``model=<deltatune PeftModel>``) give PEFT's
losses step for step, train only the prompt, leave the base alone and write checkpoints that PEFT loads with the
trained model's outputs. Prefix tuning needs ``activation_checkpointing=False`` (its prefixes are a KV cache, which
transformers drops under checkpointing; PEFT fails there too), and deltatune says so before training.
"""

from __future__ import annotations

import os
import warnings

import peft
import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer

import deltatune as dt
from deltatune.prompt_learning import prompt_embeddings
from deltatune.quant import Linear4bit, Linear8bit, quantize_arguments, quantize_model

from .twins import arguments, losses, token_dataset

trl = pytest.importorskip("trl")
from .test_trl import TOKENIZER, common, sft_data, tiny_chat_llama  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

METHODS = {  # name -> (config class name in both libraries, its settings)
    "prompt": ("PromptTuningConfig", {}),
    "ptuning": ("PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "prefix": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 16}),
}


def make_config(library, method: str):
    name, settings = METHODS[method]
    return getattr(library, name)(task_type="CAUSAL_LM", num_virtual_tokens=4, **settings)


def sft_args(output_dir, method: str):
    """TRL's defaults (gradient checkpointing on) but for prefix tuning, which cannot train under it."""
    extra = {"activation_checkpointing": False} if method == "prefix" else {}
    return trl.SFTConfig(**common(output_dir), **extra)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def out_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([TOKENIZER("Say gold: ")["input_ids"]])
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def check_trained(trainer, base_before: dict[str, torch.Tensor], prompt_before: torch.Tensor, checkpoint) -> None:
    """Only the prompt trained; the checkpoint is an adapter folder that PEFT loads with the same outputs."""
    model = trainer.model
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, _ in model.named_parameters() if n.startswith("prompt_encoder.default.")]
    after = state(model.get_base_model())
    assert after.keys() == base_before.keys() and all(torch.equal(after[k], v) for k, v in base_before.items())
    prompt = prompt_embeddings(model.prompt_encoder["default"])
    assert torch.isfinite(prompt).all() and not torch.allclose(prompt, prompt_before)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert "model.safetensors" not in os.listdir(checkpoint)
    theirs = peft.PeftModel.from_pretrained(tiny_chat_llama(), str(checkpoint))
    torch.testing.assert_close(out_logits(theirs), out_logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_sft_trainer_takes_a_deltatune_prompt_config(method, tmp_path):
    runs, trainers = {}, {}
    for library in (dt, peft):
        base = tiny_chat_llama()
        trainer = trl.SFTTrainer(model=base, args=sft_args(tmp_path / library.__name__, method),
                                 train_dataset=sft_data(), processing_class=TOKENIZER,
                                 peft_config=make_config(library, method))
        if library is dt:
            assert isinstance(trainer.model, dt.PeftModelForCausalLM)
            base_before = state(base)
            prompt_before = prompt_embeddings(trainer.model.prompt_encoder["default"]).clone()
        trainer.train()
        runs[library.__name__], trainers[library.__name__] = losses(trainer), trainer
    # TRL seeds before the adapter is drawn, and deltatune draws as PEFT does: the same runs
    torch.testing.assert_close(runs["deltatune"], runs["peft"], rtol=1e-5, atol=1e-6)
    assert runs["deltatune"][0] != runs["deltatune"][-1]
    check_trained(trainers["deltatune"], base_before, prompt_before, tmp_path / "deltatune" / "checkpoint-3")


@pytest.mark.parametrize("method", list(METHODS))
def test_sft_trainer_with_a_deltatune_prompt_model(method, tmp_path):
    runs, trainers = {}, {}
    for library in (dt, peft):
        torch.manual_seed(0)
        model = library.get_peft_model(tiny_chat_llama(), make_config(library, method))
        if library is dt:
            base_before = state(model.get_base_model())
            prompt_before = prompt_embeddings(model.prompt_encoder["default"]).clone()
        trainer = trl.SFTTrainer(model=model, args=sft_args(tmp_path / library.__name__, method),
                                 train_dataset=sft_data(), processing_class=TOKENIZER)
        trainer.train()
        runs[library.__name__], trainers[library.__name__] = losses(trainer), trainer
    torch.testing.assert_close(runs["deltatune"], runs["peft"], rtol=1e-5, atol=1e-6)
    check_trained(trainers["deltatune"], base_before, prompt_before, tmp_path / "deltatune" / "checkpoint-3")


def test_prefix_tuning_with_gradient_checkpointing_is_refused_before_training(tmp_path):
    base = tiny_chat_llama()
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    message = r"Prefix tuning cannot train with gradient \(activation\) checkpointing.*activation_checkpointing=False"
    args = trl.SFTConfig(**common(tmp_path / "a"))
    assert args.activation_checkpointing  # TRL's default
    with pytest.raises(ValueError, match=message):
        trl.SFTTrainer(model=base, args=args, train_dataset=sft_data(), processing_class=TOKENIZER,
                       peft_config=make_config(dt, "prefix"))
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads  # not wrapped
    model = dt.get_peft_model(tiny_chat_llama(), make_config(dt, "prefix"))
    with pytest.raises(ValueError, match=message):
        trl.SFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=TOKENIZER)


# ---- a quantized base ----------------------------------------------------------------------------------------------

BNB = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                   bnb_4bit_use_double_quant=True),
       "int8": dict(load_in_8bit=True)}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt_base")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("method", "kind"), [("prompt", "nf4"), ("ptuning", "int8"), ("prefix", "nf4")])
def test_trainer_on_a_bitsandbytes_base_matches_peft(method, kind, base_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    checkpointing = method != "prefix"  # prefix tuning's KV cache does not survive gradient checkpointing
    runs = {}
    for library in (dt, peft):
        base = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**BNB[kind]))
        base = library.prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = library.get_peft_model(base, make_config(library, method))
        trainer = Trainer(model=model, args=arguments(tmp_path / library.__name__, eval_strategy="no", optim="sgd",
                                                      learning_rate=0.2),
                          train_dataset=token_dataset(labels=lambda ids, g: ids.tolist()))
        trainer.train()
        runs[library.__name__] = losses(trainer)
    torch.testing.assert_close(runs["deltatune"], runs["peft"], rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(torch.tensor(runs["deltatune"]))) and runs["deltatune"][0] != runs["deltatune"][-1]


def quantized(base_dir, kind: str) -> LlamaForCausalLM:
    """The base with deltatune's own NF4 / int8 linear layers (as ``deltatune train --quantize``)."""
    return quantize_model(LlamaForCausalLM.from_pretrained(base_dir), **quantize_arguments(kind)).eval()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method", list(METHODS))
def test_prompt_methods_train_on_deltatune_quantized_base(method, kind, base_dir, tmp_path):
    """On deltatune's pure-PyTorch 4/8-bit base: the loss of a fixed batch falls, only the prompt changes (the
    quantized codes do not), and the saved adapter reloads on a fresh quantized base with equal outputs."""
    torch.manual_seed(0)
    model = dt.get_peft_model(quantized(base_dir, kind), make_config(dt, method))
    layer = Linear4bit if kind == "nf4" else Linear8bit
    assert sum(isinstance(m, layer) for m in model.modules()) == 14
    base_before = state(model.get_base_model())
    prompt_before = prompt_embeddings(model.prompt_encoder["default"]).clone()
    ids = torch.randint(2, 96, (4, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    trace = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trace.append(loss.item())
    assert all(torch.isfinite(torch.tensor(trace))) and trace[-1] < trace[0] - 0.05, trace
    after = state(model.get_base_model())
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    prompt = prompt_embeddings(model.prompt_encoder["default"])
    assert torch.isfinite(prompt).all() and not torch.allclose(prompt, prompt_before)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(quantized(base_dir, kind), str(tmp_path))
    test = {"input_ids": ids[:2, :6], "attention_mask": torch.ones_like(ids[:2, :6])}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**test).logits, model.eval()(**test).logits, rtol=1e-5, atol=1e-5)
