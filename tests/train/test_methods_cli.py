"""``deltatune train --method lora|ia3|bottleneck``: each method's flags, files, inspect, generate, evaluate, merge.

The methods and their flags come from the registry (``methods.METHODS``, each entry's ``cli``); these tests
check that the command line, TrainConfig and YAML files follow it, and that every command works for every
method on the tiny Llama.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deltatune import cli
from deltatune.methods import METHODS
from deltatune.methods.bottleneck import BottleneckLayer
from deltatune.methods.ia3 import IA3Layer
from deltatune.methods.lora import LoraConfig, LoraLayer
from deltatune.methods.options import KINDS
from deltatune.train import infer as infermod
from deltatune.train import run as runmod
from deltatune.train.config import TrainConfig, config_from_sources, method_config, method_names
from deltatune.train.infer import load_adapted

from .tiny import alpaca_rows, make_tiny_model_dir, write_jsonl

# --method -> (its flags in the run, peft_type, adapter_config.json fields, inspect fields, layer class, trained key)
CASES = {
    "lora": (["--r", "4", "--alpha", "8", "--dropout", "0.0", "--target-modules", "q_proj,v_proj"], "LORA",
             {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
             {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"], "adapted_modules": 4},
             LoraLayer, "lora_B"),
    "ia3": (["--feedforward-modules", "down_proj"], "IA3",
            {"feedforward_modules": ["down_proj"], "target_modules": ["k_proj", "v_proj", "down_proj"]},
            {"feedforward_modules": ["down_proj"], "targets": ["down_proj", "k_proj", "v_proj"],
             "adapted_modules": 6, "parameters": 2 * (16 + 16 + 64)},
            IA3Layer, "ia3_l"),
    "bottleneck": (["--bottleneck-size", "4", "--placement", "houlsby", "--non-linearity", "gelu"], "BOTTLENECK",
                   {"bottleneck_size": 4, "reduction_factor": None, "placement": "houlsby", "non_linearity": "gelu"},
                   {"bottleneck_size": 4, "placement": "houlsby", "non_linearity": "gelu", "adapted_modules": 4,
                    "parameters": 4 * (4 * 32 + 4 + 32 * 4 + 32)},
                   BottleneckLayer, "adapter_up"),
}
RUN = ["--max-steps", "6", "--batch-size", "4", "--grad-accum", "1", "--lr", "0.05", "--precision", "fp32",
       "--threads", "1", "--eval-size", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return make_tiny_model_dir(str(root / "model")), write_jsonl(str(root / "data.jsonl"), alpaca_rows(24))


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tiny, tmp_path_factory):
    """(method, its run folder), trained through the command line with the method's own flags."""
    method = request.param
    run = str(tmp_path_factory.mktemp(method) / "run")
    model_dir, data = tiny
    assert cli.main(["train", "--model", model_dir, "--data", data, "--method", method, *CASES[method][0], *RUN,
                     "--output", run]) == 0
    return method, run


def read_config(run: str) -> dict:
    with open(os.path.join(run, "adapter_config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_train_writes_the_method_adapter_with_its_flags(trained):
    method, run = trained
    _, peft_type, fields, _, _, trained_key = CASES[method]
    config = read_config(run)
    assert config["peft_type"] == peft_type and config["task_type"] == "CAUSAL_LM"
    for key, value in fields.items():
        assert config[key] == value, key
    tensors = load_file(os.path.join(run, "adapter_model.safetensors"))
    start = 1.0 if method == "ia3" else 0.0  # (IA)^3 vectors start at ones; LoRA's B and the up projection at zero
    assert any((tensor - start).abs().max() > 0 for key, tensor in tensors.items() if trained_key in key)


def test_inspect_shows_the_method_settings(trained, capsys):
    method, run = trained
    assert cli.main(["inspect", run, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == CASES[method][1]
    for key, value in CASES[method][3].items():
        assert info[key] == value, key
    assert cli.main(["inspect", run]) == 0
    printed = capsys.readouterr().out
    assert all(f"{key} " in printed for key in CASES[method][3])


def test_generate_and_evaluate_load_every_method(trained, tiny, capsys):
    method, run = trained
    peft_model, tokenizer = load_adapted(run)
    assert any(isinstance(m, CASES[method][4]) for m in peft_model.modules())
    base = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    ids = torch.tensor([tokenizer("<|im_start|>user\nSay red<|im_end|>\n<|im_start|>assistant\n",
                                  add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, base(ids).logits, atol=1e-4)  # the trained adapter acts
        expected = peft_model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert cli.main(["generate", "--adapter", run, "--max-new-tokens", "4", "Say red"]) == 0
    assert capsys.readouterr().out.strip() == tokenizer.decode(expected[0, ids.shape[1]:],
                                                               skip_special_tokens=True).strip()
    assert cli.main(["evaluate", "--adapter", run, "--data", tiny[1]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 24 and report["loss"] > 0


def test_merge_where_the_method_merges(trained, tmp_path, capsys, monkeypatch):
    method, run = trained
    out = tmp_path / "merged"
    if not METHODS[CASES[method][1]].mergeable:
        monkeypatch.setattr(infermod, "load_adapted", lambda *a, **k: pytest.fail("loaded the model"))
        assert cli.main(["merge", "--adapter", run, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"deltatune merge: error: {run} is a {method} adapter (BOTTLENECK), which cannot be "
                              "merged") and err.count("\n") == 1
        assert "Nothing was written" in err and "lora, ia3" in err
        assert not out.exists()
        return
    assert cli.main(["merge", "--adapter", run, "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    peft_model, tokenizer = load_adapted(run)
    ids = torch.tensor([tokenizer("<|im_start|>user\nSay blue<|im_end|>\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)


# ---- settings: from the registry, checked before anything is loaded --------------------------------------------------

def test_method_choices_and_flags_come_from_the_registry():
    names = [m.cli.name for m in METHODS.values() if m.cli is not None]
    assert list(method_names()) == names and {"lora", "ia3", "bottleneck"} <= set(names)
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    assert actions["method"].choices == names
    run_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"r", "alpha", "dropout"}
    for method in (m for m in METHODS.values() if m.cli is not None):
        fields = {f.name for f in dataclasses.fields(method.config_class)}
        for opt in method.cli.options:
            assert opt.field in fields and opt.kind in KINDS, (method.cli.name, opt)
            assert opt.key not in run_fields, f"--{opt.flag} of {method.cli.name} is a flag of the run itself"
            assert f"--{opt.flag}" in actions[opt.key].option_strings
        config = method_config(TrainConfig(method=method.cli.name))  # the declared defaults are accepted
        assert isinstance(config, method.config_class)


def test_default_run_is_unchanged():
    config = TrainConfig()
    assert (config.method, config.r, config.alpha, config.dropout, config.lr, config.target_modules,
            config.options) == ("lora", 8, 16, 0.05, 2e-3, "all-linear", {})
    assert method_config(config, "base").to_dict() == LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM",
        base_model_name_or_path="base").to_dict()


def test_library_options_are_checked_like_flags():
    config = TrainConfig(method="bottleneck", options={"bottleneck_size": 8})
    assert method_config(config).bottleneck_size == 8
    for options, message in (({"r": 4}, "'r' is a TrainConfig field"), ({"rank": 4}, "unknown method setting 'rank'"),
                             ({"placement": 3}, "placement must be text, got 3")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(method="bottleneck", options=options)
    given = {"bottleneck_size": 8}
    TrainConfig(method="bottleneck", options=given)
    assert given == {"bottleneck_size": 8}  # the defaults went into the config's copy


def test_method_defaults():
    ia3, bottleneck = TrainConfig(method="ia3"), TrainConfig(method="bottleneck")
    assert (ia3.lr, ia3.target_modules, ia3.r, ia3.alpha, ia3.dropout) == (1e-2, None, None, None, None)
    assert (bottleneck.lr, bottleneck.target_modules) == (1e-3, None)
    made = method_config(bottleneck)
    assert (made.reduction_factor, made.bottleneck_size, made.placement, made.non_linearity) == \
        (16, None, "pfeiffer", "relu")
    assert TrainConfig(method="ia3", lr=0.5).lr == 0.5


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "ia3", "--r", "4"], "r is a setting of --method lora, not of --method ia3 (which takes "
                                      "--feedforward-modules)."),
    (["--method", "bottleneck", "--alpha", "4"], "alpha is a setting of --method lora, not of --method bottleneck"),
    (["--method", "ia3", "--placement", "houlsby"], "placement is a setting of --method bottleneck, not of --method "
                                                    "ia3"),
    (["--bottleneck-size", "8"], "bottleneck_size is a setting of --method bottleneck, not of --method lora (which "
                                 "takes --r, --alpha, --dropout, --dora, --init)."),
    (["--method", "bottleneck", "--bottleneck-size", "0"], "bottleneck_size must be a positive integer"),
    (["--method", "bottleneck", "--bottleneck-size", "4", "--reduction-factor", "2"],
     "give bottleneck_size or reduction_factor, not both"),
    (["--method", "bottleneck", "--reduction-factor", "nan"], "reduction_factor must be a finite number, got nan"),
    (["--method", "bottleneck", "--reduction-factor", "-2"], "reduction_factor must be > 0"),
    (["--method", "ia3", "--target-modules", "q_proj,v_proj", "--feedforward-modules", "down_proj"],
     "feedforward_modules"),
    (["--dropout", "1"], r"dropout must be a number in [0, 1), got 1.0."),
    (["--alpha", "0"], "alpha must be > 0, got 0.0."),
])
def test_a_wrong_method_setting_is_one_line_before_loading(tiny, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(runmod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(runmod, "load_tokenizer", lambda *a, **k: pytest.fail("loaded the tokenizer"))
    model_dir, data = tiny
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune train: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_choices_of_a_method_flag_are_argparse_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(["train", "--method", "bottleneck", "--placement", "middle"])
    assert stop.value.code == 2 and "invalid choice: 'middle'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--method", "dora"])


def test_yaml_carries_method_settings_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: bottleneck\nbottleneck-size: 4\nplacement: houlsby\nlr: 3e-3\n")
    config = config_from_sources(str(path), {"placement": "pfeiffer", "non_linearity": None})
    assert (config.method, config.lr, config.options) == ("bottleneck", 3e-3, {"bottleneck_size": 4,
                                                                               "placement": "pfeiffer"})
    made = method_config(config)
    assert (made.bottleneck_size, made.placement, made.non_linearity) == (4, "pfeiffer", "relu")
    path.write_text("method: ia3\nfeedforward_modules: down_proj\ntarget_modules: k_proj,v_proj,down_proj\n")
    assert method_config(config_from_sources(str(path), {})).feedforward_modules == ["down_proj"]


@pytest.mark.parametrize(("text", "message"), [
    ("method: bottleneck\nbottleneck_size: 0\n", "run.yaml: bottleneck_size must be a positive integer"),
    ("method: bottleneck\nbottleneck_size: '8'\n", "run.yaml: bottleneck_size must be an integer, got the text '8'"),
    ("method: ia3\nr: 4\n", "run.yaml: r is a setting of --method lora, not of --method ia3"),
    ("method: bottleneck\nplacement: middle\n", "run.yaml: Unknown placement 'middle'; expected one of pfeiffer, "
                                                "houlsby."),
    ("method: ia3\nfeedforward_modules: 5\n", "run.yaml: feedforward_modules=5 must be a list"),
    ("bottleneck: 4\n", "run.yaml: unknown settings ['bottleneck']"),
])
def test_yaml_with_a_wrong_method_setting_names_the_file(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        config_from_sources(str(path), {})
    assert str(info.value).startswith(str(tmp_path)) and message in str(info.value), str(info.value)


def test_a_bottleneck_too_large_for_memory_is_refused_before_allocating(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runmod, "get_peft_model", lambda *a, **k: pytest.fail("allocated the adapter"))
    model_dir, data = tiny
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "o"), "--method",
                     "bottleneck", "--bottleneck-size", "100000000000", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "bottleneck_size=100000000000 makes an adapter of" in err and "Choose a smaller --bottleneck-size" in err


@pytest.mark.parametrize("method", ["ia3", "bottleneck"])
def test_quantized_base_trains_each_method(method, tiny, tmp_path):
    """--quantize nf4 with (IA)^3 and bottleneck adapters: trains, reloads on the same 4-bit base, and (IA)^3 merges
    into a float model that computes what the 4-bit base + vectors compute."""
    from deltatune.quant import Linear4bit

    model_dir, data = tiny
    run = str(tmp_path / "run")
    assert cli.main(["train", "--model", model_dir, "--data", data, "--method", method, "--quantize", "nf4", *RUN,
                     "--output", run]) == 0
    peft_model, tokenizer = load_adapted(run)
    assert any(isinstance(m, Linear4bit) for m in peft_model.modules())
    assert any(isinstance(m, CASES[method][4]) for m in peft_model.modules())
    if method != "ia3":
        return
    out = str(tmp_path / "merged")
    assert cli.main(["merge", "--adapter", run, "--output", out]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer("<|im_start|>user\nSay gold<|im_end|>\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)


PROMPT_CASES = {
    "prompt": (["--num-virtual-tokens", "4", "--prompt-init", "SAMPLE_VOCAB"], "PROMPT_TUNING"),
    "ptuning": (["--num-virtual-tokens", "4", "--encoder-type", "LSTM", "--encoder-hidden-size", "16"], "P_TUNING"),
    "prefix": (["--num-virtual-tokens", "4", "--prefix-projection", "--encoder-hidden-size", "16"], "PREFIX_TUNING"),
}


@pytest.mark.parametrize("method", list(PROMPT_CASES))
def test_prompt_methods_train_generate_and_refuse_merge(method, tiny, tmp_path, capsys):
    model_dir, data = tiny
    flags, peft_type = PROMPT_CASES[method]
    run = str(tmp_path / "run")
    assert cli.main(["train", "--model", model_dir, "--data", data, "--method", method, *flags, *RUN,
                     "--output", run]) == 0
    config = read_config(run)
    assert config["peft_type"] == peft_type and config["num_virtual_tokens"] == 4
    assert load_file(os.path.join(run, "adapter_model.safetensors"))["prompt_embeddings"].shape[0] >= 4
    assert cli.main(["generate", "--adapter", run, "--max-new-tokens", "3", "Say red"]) == 0
    capsys.readouterr()
    assert cli.main(["merge", "--adapter", run, "--output", str(tmp_path / "merged")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "merged")


# ---- --prompt-init-text and prompt methods on a quantized base -------------------------------------------------------

class Capture:
    """Wraps the run's get_peft_model, init_prompt_from_text and _save_adapter: the base and the prompt as they
    started (``start``; ``initial`` after a text init), and the model as it was saved."""

    def __init__(self, monkeypatch):
        from deltatune.prompt_learning import prompt_embeddings

        self.initial = self.start = self.base = self.saved = None
        make, save = runmod.get_peft_model, runmod._save_adapter

        def get_peft_model(model, config):
            peft_model = make(model, config)
            self.base = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.start = prompt_embeddings(peft_model.prompt_encoder["default"]).detach().clone()
            return peft_model

        def init_prompt_from_text(*args, **kwargs):
            self.initial = text_init(*args, **kwargs).detach().clone()
            return self.initial

        def save_adapter(peft_model, *args):
            self.saved = peft_model
            return save(peft_model, *args)

        text_init = runmod.init_prompt_from_text
        monkeypatch.setattr(runmod, "get_peft_model", get_peft_model)
        monkeypatch.setattr(runmod, "init_prompt_from_text", init_prompt_from_text)
        monkeypatch.setattr(runmod, "_save_adapter", save_adapter)


def prompt_logits(model, tokenizer, text: str = "Say gold") -> torch.Tensor:
    ids = torch.tensor([tokenizer(f"<|im_start|>user\n{text}<|im_end|>\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_prompt_init_text_starts_the_prompt_from_the_text(tiny, tmp_path, monkeypatch):
    """The first prompt is the base's embedding rows of the text's token ids (repeated to P, PEFT's rule), made with
    the run's own tokenizer; adapter_config.json records the TEXT init as PEFT's does, and PEFT loads the adapter
    with the outputs of the trained model."""
    import peft

    from deltatune.formats.models import load_tokenizer, resolve_model

    model_dir, data = tiny
    capture = Capture(monkeypatch)
    run = str(tmp_path / "run")
    assert cli.main(["train", "--model", model_dir, "--data", data, "--method", "prompt", "--num-virtual-tokens", "6",
                     "--prompt-init-text", "Say:", *RUN, "--output", run]) == 0
    tokenizer = load_tokenizer(resolve_model(model_dir))
    ids = tokenizer("Say:")["input_ids"]
    assert len(ids) == 4
    words = AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight
    assert torch.equal(capture.initial, words[(ids * 2)[:6]])
    config = read_config(run)
    assert (config["prompt_tuning_init"], config["prompt_tuning_init_text"], config["tokenizer_name_or_path"],
            config["tokenizer_kwargs"]) == ("TEXT", "Say:", model_dir, None)
    saved = load_file(os.path.join(run, "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.isfinite(saved).all() and not torch.allclose(saved, capture.initial)  # trained from there
    expected = prompt_logits(capture.saved, tokenizer)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run)
    torch.testing.assert_close(prompt_logits(theirs, tokenizer), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--prompt-init-text", ""], "prompt_init_text must not be empty"),
    (["--prompt-init", "SAMPLE_VOCAB", "--prompt-init-text", "Say:"],
     "prompt_init_text starts the virtual tokens from the text's tokens and prompt_init='SAMPLE_VOCAB' says "
     "otherwise; give only one of --prompt-init-text and --prompt-init."),
])
def test_a_bad_prompt_init_text_is_one_line_before_loading(tiny, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(runmod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(runmod, "load_tokenizer", lambda *a, **k: pytest.fail("loaded the tokenizer"))
    model_dir, data = tiny
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "o"), "--method",
                     "prompt", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune train: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_a_prompt_init_text_without_tokens_is_refused_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    """A tokenizer that drops whitespace finds no token in "   ": refused, naming the text, before loading."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "say": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>")
    monkeypatch.setattr(runmod, "load_tokenizer", lambda source: tokenizer)
    monkeypatch.setattr(runmod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    model_dir, data = tiny
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "o"), "--method",
                     "prompt", "--prompt-init-text", "   "]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune train: error: prompt_init_text=' ' tokenizes to no tokens with the model's "
                          "tokenizer; give a text with at least one token") and err.count("\n") == 1, err


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("method", list(PROMPT_CASES))
def test_quantized_base_trains_each_prompt_method(method, quantize, tiny, tmp_path, monkeypatch):
    """--quantize with prompt, P- and prefix tuning: the prompt trains (its saved value moved from the start, finite
    losses), the 4/8-bit base does not change, and the adapter reloads on the same quantized base with the trained
    model's outputs."""
    from deltatune.prompt_learning import prompt_embeddings
    from deltatune.quant import Linear4bit, Linear8bit

    model_dir, data = tiny
    capture = Capture(monkeypatch)
    flags = ["--num-virtual-tokens", "4", "--prompt-init-text", "Say:"] if method == "prompt" else \
        PROMPT_CASES[method][0]
    run = str(tmp_path / "run")
    assert cli.main(["train", "--model", model_dir, "--data", data, "--method", method, "--quantize", quantize,
                     *flags, *RUN, "--output", run]) == 0
    layer = Linear4bit if quantize == "nf4" else Linear8bit
    trained = capture.saved
    base = trained.get_base_model()
    assert sum(isinstance(m, layer) for m in base.modules()) == 14  # 7 linear layers per block, not the head
    after = base.state_dict()
    assert after.keys() == capture.base.keys() and all(torch.equal(after[k], v) for k, v in capture.base.items())
    saved = load_file(os.path.join(run, "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(saved, prompt_embeddings(trained.prompt_encoder["default"]))
    assert torch.isfinite(saved).all()
    assert not torch.allclose(saved, capture.initial if method == "prompt" else capture.start)  # it trained
    with open(os.path.join(run, "train_log.jsonl"), encoding="utf-8") as fh:
        losses = [json.loads(line)["loss"] for line in fh if '"loss"' in line]
    assert len(losses) == 6 and all(map(math.isfinite, losses))
    loaded, tokenizer = load_adapted(run)
    assert sum(isinstance(m, layer) for m in loaded.modules()) == 14
    torch.testing.assert_close(prompt_logits(loaded, tokenizer), prompt_logits(trained, tokenizer),
                               rtol=1e-5, atol=1e-5)
