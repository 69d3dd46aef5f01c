"""Tiny random models of real architectures, so tests need no download and run in seconds."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

VOCAB = 96


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier() -> BertForSequenceClassification:
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config).eval()


MODELS = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert_classifier,
    "t5": tiny_t5,
}


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with warnings silenced (PEFT and transformers warn on the tiny models)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def snapshot(model: torch.nn.Module) -> tuple:
    """Module tree, values and requires_grad: what "the model is unchanged" compares."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    tree, values, grads = snapshot(model)
    assert tree == before[0]
    assert values.keys() == before[1].keys() and all(torch.equal(values[k], before[1][k]) for k in values)
    assert grads == before[2]


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]()


def model_inputs(kind: str, seed: int = 1, batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=generator)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@torch.no_grad()
def perturb(model: torch.nn.Module, keys: tuple[str, ...] = ("lora_", "modules_to_save"), seed: int = 3) -> None:
    """Give adapter weights random values, so that B != 0 and the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if any(k in name for k in keys):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fused_at_any_size(request):
    """The tests' models are tiny, below the size where a CPU training forward takes the fused LoRA/DoRA path
    (``lora.FUSED_MIN_WORK``); the tests of that path need it taken at any size. Tests marked ``default_fusing``
    see the library's default. (A patch of its own, so that a test's ``monkeypatch.undo()`` leaves it.)"""
    if request.node.get_closest_marker("default_fusing") is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("deltatune.methods.lora.FUSED_MIN_WORK", 0)
        yield
