"""Prompt tuning's TEXT init from a tokenizer object (``methods/prompt_tuning.py``: ``text_token_ids``,
``init_prompt_from_text``), for models whose tokenizer has no folder to name in ``tokenizer_name_or_path``.

Oracles: the embedding rows of the text's token ids (repeated and cut to P, PEFT's rule), and HF PEFT's own
TEXT init from the same tokenizer saved to a folder. What is saved loads in PEFT with the same outputs.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.methods.prompt_tuning import init_prompt_from_text, text_token_ids
from tests.methods.test_prompt_learning import assert_unchanged, snapshot
from tests.train.tiny import tiny_tokenizer

TOKENIZER = tiny_tokenizer()
TEXT = "Hi!"  # three byte tokens with the tiny tokenizer


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama whose vocabulary is the tiny byte tokenizer's."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def prompt_model(p: int = 7, **extra) -> dt.PeftModel:
    torch.manual_seed(0)
    return dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, **extra))


class Silent:
    """A tokenizer that finds no tokens in any text (as one that drops whitespace does for "   ")."""

    name_or_path = "silent"

    def __call__(self, text):
        return {"input_ids": []}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize(("p", "expected"), [(7, [5, 6, 7, 5, 6, 7, 5]), (3, [5, 6, 7]), (2, [5, 6])])
def test_text_ids_are_repeated_and_cut_to_p(p, expected):
    stub = lambda text: {"input_ids": [5, 6, 7]}  # noqa: E731
    assert text_token_ids("any", stub, p) == expected


@pytest.mark.parametrize("p", [2, 7])
def test_initial_prompt_is_the_embedding_rows_of_the_text_tokens(p):
    model = prompt_model(p)
    parameter = model.prompt_encoder["default"].embedding.weight
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    returned = init_prompt_from_text(model, TEXT, TOKENIZER, tokenizer_name_or_path="tok")
    ids = TOKENIZER(TEXT)["input_ids"]
    assert len(ids) == 3
    rows = tiny_llama().get_input_embeddings().weight[(ids * 3)[:p]]
    assert torch.equal(parameter, rows) and torch.equal(returned, rows)
    assert model.prompt_encoder["default"].embedding.weight is parameter and parameter.requires_grad  # same parameter
    assert parameter.dtype == torch.float32
    assert all(torch.equal(v, base[k]) for k, v in model.get_base_model().state_dict().items())
    assert [n for n, q in model.named_parameters() if q.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    config = model.peft_config["default"]
    assert (config.prompt_tuning_init, config.prompt_tuning_init_text, config.tokenizer_name_or_path,
            config.tokenizer_kwargs) == ("TEXT", TEXT, "tok", None)


def test_equals_peft_text_init_from_the_same_tokenizer(tmp_path):
    TOKENIZER.save_pretrained(tmp_path)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=TEXT,
            tokenizer_name_or_path=str(tmp_path)))
    ours = prompt_model(7)
    init_prompt_from_text(ours, TEXT, TOKENIZER, tokenizer_name_or_path=str(tmp_path))
    expected = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(ours.prompt_encoder["default"].embedding.weight, expected)
    ids = torch.tensor([TOKENIZER("Say red")["input_ids"]])
    assert torch.equal(logits(ours, ids), logits(theirs, ids))


def test_saved_text_adapter_loads_in_peft_and_deltatune_without_the_tokenizer(tmp_path):
    """adapter_config.json records TEXT with the tokenizer's name, as PEFT's own TEXT init does (PEFT refuses TEXT
    without one); loading reads no tokenizer: the name here is a folder that does not exist."""
    model = prompt_model(5)
    init_prompt_from_text(model, TEXT, TOKENIZER, tokenizer_name_or_path="nowhere/tokenizer")
    with torch.no_grad():  # as after training: the saved prompt is not the init
        model.prompt_encoder["default"].embedding.weight.add_(0.5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["prompt_tuning_init"], saved["prompt_tuning_init_text"], saved["tokenizer_name_or_path"]) == \
        ("TEXT", TEXT, "nowhere/tokenizer")
    ids = torch.tensor([TOKENIZER("Say blue")["input_ids"]])
    expected = logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert theirs.peft_config["default"].prompt_tuning_init == "TEXT"
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=0, atol=1e-6)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected[:, -1], logits(tiny_llama(), ids)[:, -1], atol=1e-3)  # the prompt acts


def test_recorded_tokenizer_name(tmp_path):
    TOKENIZER.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    named = AutoTokenizer.from_pretrained(tmp_path)
    model = prompt_model(3)
    init_prompt_from_text(model, TEXT, named)  # the tokenizer's own name_or_path
    assert model.peft_config["default"].tokenizer_name_or_path == str(tmp_path)
    model = prompt_model(3, base_model_name_or_path="org/base")
    init_prompt_from_text(model, TEXT, TOKENIZER)  # a tokenizer built in memory: the base model's name
    assert model.peft_config["default"].tokenizer_name_or_path == "org/base"
    init_prompt_from_text(model, TEXT, TOKENIZER, tokenizer_name_or_path=str(tmp_path),
                          tokenizer_kwargs={"gguf_file": "m.gguf"})
    assert model.peft_config["default"].tokenizer_kwargs == {"gguf_file": "m.gguf"}


def test_other_adapter_by_name():
    model = prompt_model(3)
    model.add_adapter("other", dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    default = model.prompt_encoder["default"].embedding.weight.detach().clone()
    init_prompt_from_text(model, TEXT, TOKENIZER, adapter_name="other", tokenizer_name_or_path="tok")
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, default)
    ids = (TOKENIZER(TEXT)["input_ids"] * 2)[:4]
    assert torch.equal(model.prompt_encoder["other"].embedding.weight, tiny_llama().get_input_embeddings().weight[ids])
    assert model.peft_config["default"].prompt_tuning_init == "RANDOM"


ERRORS = {
    "no tokens": (lambda: ("   ", Silent()), {}, r"prompt_tuning_init_text='   ' tokenizes to no tokens with the "
                                                  r"model's tokenizer; give a text with at least one token"),
    "not text": (lambda: (None, TOKENIZER), {}, r"prompt_tuning_init_text=None must be a string"),
    "ids outside the vocabulary": (lambda: ("a", lambda text: {"input_ids": [1, 500]}), {},
                                   r"gives token ids \[500\] outside the model's vocabulary of 259"),
    "unknown adapter": (lambda: (TEXT, TOKENIZER), {"adapter_name": "nope"},
                        r"'nope' is not an adapter of this model \(adapters: \['default'\]\)"),
    "no name to record": (lambda: (TEXT, TOKENIZER), {}, r"give tokenizer_name_or_path"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_text_init_is_a_clear_error_and_changes_nothing(case):
    make, kwargs, message = ERRORS[case]
    model = prompt_model(4)
    model.peft_config["default"].base_model_name_or_path = None
    config_before = model.peft_config["default"].to_dict()
    before = snapshot(model)
    text, tokenizer = make()
    with pytest.raises(ValueError, match=message):
        init_prompt_from_text(model, text, tokenizer, **kwargs)
    assert_unchanged(model, before)
    assert model.peft_config["default"].to_dict() == config_before


def test_only_prompt_tuning_adapters():
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                   encoder_hidden_size=8))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"needs a deltatune PROMPT_TUNING adapter; 'default' is a P_TUNING adapter"):
        init_prompt_from_text(model, TEXT, TOKENIZER, tokenizer_name_or_path="tok")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"needs a deltatune PeftModel .* got LlamaForCausalLM"):
        init_prompt_from_text(tiny_llama(), TEXT, TOKENIZER, tokenizer_name_or_path="tok")


def test_trainable_load_of_a_text_adapter_reads_no_tokenizer(tmp_path):
    """The file's prompt is the start: is_trainable=True must not redo the TEXT init (the config may name a Hub id)."""
    model = prompt_model(4)
    init_prompt_from_text(model, TEXT, TOKENIZER, tokenizer_name_or_path="HuggingFaceTB/not-a-local-folder")
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.add_(0.5)  # trained: no longer the text's rows
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    prompt = loaded.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, model.prompt_encoder["default"].embedding.weight) and prompt.requires_grad
    assert loaded.peft_config["default"].prompt_tuning_init == "TEXT"
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(logits(loaded, ids), logits(model, ids))
