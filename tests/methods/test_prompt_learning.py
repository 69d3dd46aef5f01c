"""Prompt tuning, P-tuning and prefix tuning (methods/prompt_tuning.py, p_tuning.py, prefix_tuning.py and the input
hook in prompt_learning.py), table-driven over methods and tiny models, with HF PEFT as the oracle.

PEFT 0.21.2's forward is the oracle for logits. Its own ``generate`` does not follow transformers 5's renamed cache
arguments (it looks for ``past_key_values`` / ``cache_position``), so with the KV cache it drops or repeats the
virtual tokens; the generation oracle is therefore a greedy loop over PEFT's forward, and for beam search
transformers' own ``generate`` fed with PEFT's prompt (as ``inputs_embeds``) or PEFT's prefixes (as a pre-filled
cache). PEFT's BERT prefix tuning looks for a ``past_key_values`` argument that transformers 5 renamed, so its
oracle is PEFT's ``get_prompt`` run through the backbone as PEFT's ``_prefix_tuning_forward`` does.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from tests.conftest import assert_unchanged, make_model, snapshot
from tests.conftest import quiet as _quiet

MODELS = [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")]
METHODS = {  # name -> (config class name, shared by both libraries; kwargs)
    "prompt": ("PromptTuningConfig", {}),
    "ptuning-mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "ptuning-lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix-projection": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 16}),
}
CASES = [(method, kind, task) for method in METHODS for kind, task in MODELS]
IDS = [f"{method}-{kind}" for method, kind, _ in CASES]
P = 4  # virtual tokens
GEN = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}


def config(library, method: str, task: str, **extra):
    name, kwargs = METHODS[method]
    return getattr(library, name)(task_type=task, num_virtual_tokens=P, **kwargs, **extra)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 3) -> None:
    """Random prompt (and classifier copy) values, so the adapter clearly changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "prompt_encoder" in name or "modules_to_save" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 2.0)


def batch(padding: bool = False) -> dict[str, torch.Tensor]:
    """Two rows of 6 tokens; with ``padding`` the second is 4 tokens left-padded (right-padded for BERT-style use)."""
    ids = torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padding:
        ids[1, :2] = 0
        mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def out_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def peft_logits(theirs: nn.Module, kind: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's forward; for BERT prefix tuning its _prefix_tuning_forward with transformers 5's ``cache`` name."""
    if kind != "bert" or theirs.peft_type != peft.PeftType.PREFIX_TUNING:
        return _quiet(out_logits, theirs, inputs)
    model, ids, mask = theirs.base_model, inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        mask = torch.cat((torch.ones(ids.shape[0], P, dtype=mask.dtype), mask), dim=1)
        pooled = model.bert(input_ids=ids, attention_mask=mask, cache=theirs.get_prompt(ids.shape[0])).pooler_output
        return model.classifier(model.dropout(pooled))


def last(scores: torch.Tensor) -> torch.Tensor:
    """The last position's logits (a causal LM's output is longer by the virtual tokens), or a classifier's."""
    return scores[:, -1] if scores.dim() == 3 else scores


def greedy(forward, ids: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Greedy decoding by full forwards (no cache, no padding): the definition generate must meet."""
    for _ in range(steps):
        with torch.no_grad():
            step = forward(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        ids = torch.cat((ids, step.argmax(-1, keepdim=True)), dim=1)
    return ids


def beam_oracle(theirs: nn.Module, inputs: dict[str, torch.Tensor], beams: int = 2) -> torch.Tensor:
    """transformers' own beam search, fed PEFT's prompt as inputs_embeds or PEFT's prefixes as a filled cache."""
    model, ids, mask = theirs.get_base_model(), inputs["input_ids"], inputs["attention_mask"]
    mask = torch.cat((torch.ones(ids.shape[0], P, dtype=mask.dtype), mask), dim=1)
    with torch.no_grad():
        if theirs.peft_type == peft.PeftType.PREFIX_TUNING:
            cache = theirs.get_prompt(ids.shape[0] * beams)  # the same prefix on every row: order does not matter
            dummy = torch.zeros(ids.shape[0], P, dtype=ids.dtype)  # stands for the cached prefix positions
            out = model.generate(input_ids=torch.cat((dummy, ids), 1), attention_mask=mask, cache=cache,
                                 num_beams=beams, **GEN)
            return torch.cat((ids, out[:, -GEN["max_new_tokens"]:]), dim=1)
        embeds = torch.cat((theirs.get_prompt(ids.shape[0]), model.get_input_embeddings()(ids)), dim=1)
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=beams, **GEN)
        return torch.cat((ids, out), dim=1)


def generate(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, **GEN, **kwargs)


# ---- PEFT's adapters in deltatune, deltatune's in PEFT ---------------------------------------------


@pytest.mark.parametrize(("method", "kind", "task"), CASES, ids=IDS)
def test_peft_adapter_loads_in_deltatune_with_same_outputs(method, kind, task, tmp_path):
    torch.manual_seed(0)
    theirs = _quiet(peft.get_peft_model, make_model(kind), config(peft, method, task)).eval()
    perturb(theirs)
    _quiet(theirs.save_pretrained, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PEFT file must load without complaint
        ours = dt.PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert type(ours).__name__ == type(theirs).__name__
    for padding in (False, True):
        inputs = batch(padding)
        expected = peft_logits(theirs, kind, inputs)
        assert (last(expected) - last(out_logits(make_model(kind), inputs))).abs().max() > 1e-3
        assert (out_logits(ours, inputs) - expected).abs().max() <= 1e-5
    if task != "CAUSAL_LM":
        return
    inputs = batch()
    expected = greedy(lambda **kw: _quiet(theirs, **kw), inputs["input_ids"])
    assert torch.equal(generate(ours, inputs), expected)
    if kind == "llama":  # the tiny random GPT-2 repeats its last token whatever comes before; logits differ above
        assert not torch.equal(expected, generate(make_model(kind), inputs))  # the virtual tokens were not dropped
    if theirs.peft_type != peft.PeftType.PREFIX_TUNING:  # where PEFT's own generate works (no cache, no padding)
        assert torch.equal(generate(ours, inputs), _quiet(generate, theirs, inputs, use_cache=False))
    padded = batch(padding=True)  # each left-padded row generates as it does alone (and as PEFT's forward says)
    rows = [padded["input_ids"][0:1], padded["input_ids"][1:2, 2:]]
    alone = [greedy(lambda **kw: _quiet(theirs, **kw), row)[0, -5:] for row in rows]
    assert torch.equal(generate(ours, padded)[:, -5:], torch.stack(alone))
    for inputs in (batch(), padded):
        assert torch.equal(generate(ours, inputs, num_beams=2), _quiet(beam_oracle, theirs, inputs))


@pytest.mark.parametrize(("method", "kind", "task"), CASES, ids=IDS)
def test_deltatune_adapter_loads_in_peft_with_same_outputs(method, kind, task, tmp_path):
    torch.manual_seed(0)
    ours = dt.get_peft_model(make_model(kind), config(dt, method, task)).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, make_model(kind), tmp_path).eval()
    for padding in (False, True):
        inputs = batch(padding)
        assert (peft_logits(theirs, kind, inputs) - out_logits(ours, inputs)).abs().max() <= 1e-5
    if task == "CAUSAL_LM":
        inputs = batch()
        assert torch.equal(generate(ours, inputs), greedy(lambda **kw: _quiet(theirs, **kw), inputs["input_ids"]))
        assert torch.equal(generate(ours, inputs, num_beams=2), _quiet(beam_oracle, theirs, inputs))
    again = dt.PeftModel.from_pretrained(make_model(kind), tmp_path)  # folded: the reparameterization is gone
    assert (out_logits(again, batch(True)) - out_logits(ours, batch(True))).abs().max() <= 1e-5
    # PEFT leaves a loaded prompt trainable (requires_grad) although is_trainable=False; deltatune freezes it
    assert again.get_nb_trainable_parameters() == (0, theirs.get_nb_trainable_parameters()[1])


@pytest.mark.parametrize(("method", "kind", "task"), CASES, ids=IDS)
def test_trainable_parameter_counts_equal_peft(method, kind, task):
    torch.manual_seed(0)
    theirs = _quiet(peft.get_peft_model, make_model(kind), config(peft, method, task))
    ours = dt.get_peft_model(make_model(kind), config(dt, method, task))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable = sorted(n.replace("base_model.model.", "base_model.") for n, p in ours.named_parameters()
                       if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    saved, their_config = ours.peft_config["default"], theirs.peft_config["default"]
    for field in ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"):
        assert getattr(saved, field) == getattr(their_config, field), field


# ---- generation keeps the virtual tokens -----------------------------------------------------------

CAUSAL = [case for case in CASES if case[2] == "CAUSAL_LM"]
CAUSAL_IDS = [f"{method}-{kind}" for method, kind, _ in CAUSAL]


@pytest.mark.parametrize(("method", "kind", "task"), CAUSAL, ids=CAUSAL_IDS)
def test_generation_without_cache_equals_with_cache(method, kind, task):
    torch.manual_seed(0)
    model = dt.get_peft_model(make_model(kind), config(dt, method, task)).eval()
    perturb(model)
    for inputs in (batch(), batch(padding=True)):
        for beams in (1, 2):
            cached = generate(model, inputs, num_beams=beams)
            assert torch.equal(generate(model, inputs, num_beams=beams, use_cache=False), cached)
    with model.disable_adapter():  # the base model's own generation
        assert torch.equal(generate(model, batch()), generate(make_model(kind), batch()))


def test_forward_continues_its_own_cache():
    """A manual decoding loop over forward: a later call with the cache holding the virtual tokens only extends the
    mask and the positions."""
    for method in ("prompt", "prefix"):
        torch.manual_seed(0)
        model = dt.get_peft_model(make_model("llama"), config(dt, method, "CAUSAL_LM")).eval()
        perturb(model)
        ids = batch()["input_ids"]
        with torch.no_grad():
            first = model(input_ids=ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]), use_cache=True)
            step = model(input_ids=ids[:, 5:], attention_mask=torch.ones_like(ids), cache=first.cache, use_cache=True)
            full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert (step.logits[:, -1] - full[:, -1]).abs().max() <= 1e-5


# ---- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "kind", "task"), CASES, ids=IDS)
def test_one_training_step_changes_only_the_prompt(method, kind, task):
    torch.manual_seed(0)
    model = dt.get_peft_model(make_model(kind), config(dt, method, task))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    inputs = batch(padding=True)
    labels = inputs["input_ids"] if task == "CAUSAL_LM" else torch.tensor([0, 2])
    model.train()
    loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == expected and all("prompt_encoder." in n or ".modules_to_save." in n for n in changed)


def test_causal_lm_labels_skip_the_virtual_tokens():
    torch.manual_seed(0)
    model = dt.get_peft_model(make_model("llama"), config(dt, "prompt", "CAUSAL_LM")).eval()
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        theirs = model.get_base_model()
        embeds = torch.cat((model.prompt_encoder["default"].prompt().expand(2, -1, -1),
                            theirs.get_input_embeddings()(inputs["input_ids"])), dim=1)
        labels = torch.cat((torch.full((2, P), -100), inputs["input_ids"]), dim=1)
        expected = theirs(inputs_embeds=embeds, labels=labels).loss
    assert out.logits.shape[1] == P + 6 and torch.allclose(out.loss, expected)


# ---- files, init, switching ------------------------------------------------------------------------


def test_trainable_load_folds_the_reparameterization(tmp_path):
    torch.manual_seed(0)
    model = dt.get_peft_model(make_model("llama"), config(dt, "ptuning-mlp", "CAUSAL_LM")).eval()
    perturb(model)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="encoder network is dropped"):
        trainable = dt.PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names == ["prompt_encoder.default.embedding.weight"]
    assert (out_logits(trainable.eval(), batch()) - out_logits(model, batch())).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["prompt", "prefix-projection"])
def test_trainer_trains_saves_and_reloads_the_best_checkpoint(method, tmp_path):
    """transformers.Trainer with default collation; load_best_model_at_end loads a checkpoint's prompt_embeddings
    into the live adapter (folding a reparameterization in)."""
    import datasets
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = dt.get_peft_model(make_model("llama"), config(dt, method, "CAUSAL_LM"))
    ids = torch.randint(2, 96, (8, 8), generator=torch.Generator().manual_seed(2)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * 8, "labels": ids})
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    before = model.prompt_encoder["default"].embedding.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    _quiet(trainer.train)
    assert not torch.equal(model.prompt_encoder["default"].embedding.weight, before) or method != "prompt"
    loaded = dt.PeftModel.from_pretrained(make_model("llama"), trainer.state.best_model_checkpoint)
    assert (out_logits(loaded, batch()) - out_logits(model.eval(), batch())).abs().max() <= 1e-5


def test_text_init_equals_peft(tmp_path):
    from tests.train.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    kwargs = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "sentiment:",
              "tokenizer_name_or_path": str(tmp_path)}
    torch.manual_seed(0)
    theirs = _quiet(peft.get_peft_model, make_model("llama"), config(peft, "prompt", "CAUSAL_LM", **kwargs))
    ours = dt.get_peft_model(make_model("llama"), config(dt, "prompt", "CAUSAL_LM", **kwargs))
    expected = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(ours.prompt_encoder["default"].embedding.weight, expected)
    words = make_model("llama").get_input_embeddings().weight
    assert torch.equal(expected[0], words[tiny_tokenizer()("s")["input_ids"][0]])  # "sentiment:" is 10 tokens >= P


def test_several_prompt_adapters_switch_and_delete():
    torch.manual_seed(0)
    model = dt.get_peft_model(make_model("llama"), config(dt, "prompt", "CAUSAL_LM")).eval()
    model.add_adapter("other", config(dt, "prompt", "CAUSAL_LM"))
    perturb(model)
    first = out_logits(model, batch())
    model.set_adapter("other")
    assert not torch.equal(out_logits(model, batch()), first)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.other.embedding.weight"]
    with pytest.raises(ValueError, match="one prompt-learning adapter"):
        model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="adapter_names"):
        model(**batch(), adapter_names=["default", "other"])
    model.delete_adapter("other")
    assert torch.equal(out_logits(model, batch()), first)


# ---- bad input: clear errors, nothing changed --------------------------------------------------------

ATTACH_ERRORS = {
    "too many virtual tokens": ("llama", lambda: dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=64),
                                r"num_virtual_tokens=64 does not fit.*64 positions.*at most 63"),
    "prefix too long": ("gpt2", lambda: dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=100),
                        r"num_virtual_tokens=100 does not fit"),
    "no task type": ("llama", lambda: dt.PromptEncoderConfig(num_virtual_tokens=4), r"P_TUNING needs task_type"),
    "classifier task on a causal LM": ("llama", lambda: dt.PrefixTuningConfig(task_type="SEQ_CLS",
                                                                              num_virtual_tokens=4),
                                       r"task_type='SEQ_CLS' needs a classification head.*LlamaForCausalLM"),
    "causal LM task on a classifier": ("bert", lambda: dt.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=4),
                                       r"task_type='CAUSAL_LM' needs a language model head.*BertForSequence"),
    "seq2seq task on a causal LM": ("llama", lambda: dt.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                          num_virtual_tokens=4),
                                    r"task_type='SEQ_2_SEQ_LM' needs an encoder-decoder model.*LlamaForCausalLM"),
    "token dim of another model": ("llama", lambda: dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                          token_dim=64),
                                   r"token_dim=64 does not match the model's embedding width 32"),
}


@pytest.mark.parametrize("case", sorted(ATTACH_ERRORS))
def test_bad_attach_is_a_clear_error_and_changes_nothing(case):
    kind, make_config, message = ATTACH_ERRORS[case]
    model = make_model(kind)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        dt.get_peft_model(model, make_config())
    assert_unchanged(model, before)


def test_init_text_errors_change_nothing(tmp_path):
    from tests.train.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    model = make_model("llama")
    before = snapshot(model)
    text = {"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": str(tmp_path)}
    with pytest.raises(ValueError, match=r"prompt_tuning_init_text='' tokenizes to no tokens"):
        dt.get_peft_model(model, config(dt, "prompt", "CAUSAL_LM", prompt_tuning_init_text="", **text))
    with pytest.raises(ValueError, match=r"token ids \[.*\] outside the model's vocabulary of 96"):
        dt.get_peft_model(model, config(dt, "prompt", "CAUSAL_LM", prompt_tuning_init_text="a b", **text))
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"tokenizer_name_or_path='{missing}' is not a local folder"):
        dt.get_peft_model(model, config(dt, "prompt", "CAUSAL_LM", prompt_tuning_init="TEXT",
                                        prompt_tuning_init_text="x", tokenizer_name_or_path=missing))
    assert_unchanged(model, before)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, r"num_virtual_tokens=None must be a positive int"),
    ({"num_virtual_tokens": 0}, r"num_virtual_tokens=0"),
    ({"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT"}, r"needs tokenizer_name_or_path"),
    ({"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "t"},
     r"needs prompt_tuning_init_text"),
    ({"num_virtual_tokens": 4, "prompt_tuning_init": "WORDS"}, r"prompt_tuning_init='WORDS'"),
    ({"num_virtual_tokens": 4, "tokenizer_kwargs": {"use_fast": True}}, r"tokenizer_kwargs are only used"),
])
def test_bad_prompt_tuning_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dt.PromptTuningConfig(**kwargs)


@pytest.mark.parametrize(("make_config", "message"), [
    (lambda: dt.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU"), r"'GRU'"),
    (lambda: dt.PromptEncoderConfig(num_virtual_tokens=4, encoder_dropout=1.5), r"encoder_dropout=1\.5"),
    (lambda: dt.PrefixTuningConfig(num_virtual_tokens=4, init_weights="ones"), r"init_weights='ones'"),
    (lambda: dt.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=-1), r"encoder_hidden_size=-1"),
])
def test_bad_encoder_config_values(make_config, message):
    with pytest.raises(ValueError, match=message):
        make_config()


def test_prompt_learning_and_lora_cannot_share_a_model():
    torch.manual_seed(0)
    prompt = dt.get_peft_model(make_model("llama"), config(dt, "prompt", "CAUSAL_LM"))
    before = snapshot(prompt)
    with pytest.raises(ValueError, match=r"Prompt-learning adapters cannot share a model.*'LORA'"):
        prompt.add_adapter("lora", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"Prompt-learning adapters cannot share a model.*'PREFIX_TUNING'"):
        prompt.add_adapter("prefix", config(dt, "prefix", "CAUSAL_LM"))
    assert_unchanged(prompt, before)
    lora = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(lora)
    with pytest.raises(ValueError, match=r"Prompt-learning adapters cannot share a model.*'P_TUNING'"):
        lora.add_adapter("ptuning", config(dt, "ptuning-mlp", "CAUSAL_LM"))
    assert_unchanged(lora, before)


def test_merge_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = dt.get_peft_model(make_model("bert"), config(dt, "prefix", "SEQ_CLS")).eval()
    perturb(model)
    before, expected = snapshot(model), out_logits(model, batch())
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"\['default'\] \(PREFIX_TUNING\) cannot be merged"):
            merge()
    assert_unchanged(model, before)
    assert torch.equal(out_logits(model, batch()), expected)


@pytest.mark.parametrize(("method", "kind", "task"), CASES, ids=IDS)
def test_disable_adapter_gives_base_output(method, kind, task):
    torch.manual_seed(0)
    model = dt.get_peft_model(make_model(kind), config(dt, method, task)).eval()
    perturb(model)
    inputs = batch(padding=True)
    adapted = out_logits(model, inputs)
    with model.disable_adapter():
        assert torch.equal(out_logits(model, inputs), out_logits(make_model(kind), inputs))
    assert torch.equal(out_logits(model, inputs), adapted)


def test_prefix_under_gradient_checkpointing_is_a_clear_error():
    """transformers drops the KV cache (the prefixes) in checkpointed layers: refused with what to do, not a
    shape error from inside attention; eval and no-grad calls still work, and so does prompt tuning."""
    model = dt.get_peft_model(make_model("llama"), dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.gradient_checkpointing_enable()
    model.train()
    inputs = batch()
    with pytest.raises(ValueError, match="Prefix tuning cannot train with gradient checkpointing"):
        model(**inputs)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    prompt = dt.get_peft_model(make_model("llama"), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    prompt.gradient_checkpointing_enable()
    prompt.train()
    prompt(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert prompt.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
