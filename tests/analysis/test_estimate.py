"""``estimate_memory`` and ``deltatune estimate``: exact parameter counts, byte terms, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig

from deltatune import get_peft_model
from deltatune.analysis.memory import (
    BASELINE_BYTES,
    KEPT_RSS_FACTOR,
    LOGITS_COPIES,
    estimate_memory,
    method_config,
    saved_tensor_bytes,
)
from deltatune.cli import main

H, INNER, HEADS, KV, LAYERS, VOCAB = 64, 128, 4, 2, 2, 96


def _llama() -> LlamaConfig:
    return LlamaConfig(hidden_size=H, intermediate_size=INNER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       num_key_value_heads=KV, vocab_size=VOCAB, tie_word_embeddings=True)


def _gpt2() -> GPT2Config:
    return GPT2Config(n_embd=H, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=128)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def arch(request, tmp_path_factory) -> tuple[str, str]:
    """(name, folder holding only config.json)."""
    folder = tmp_path_factory.mktemp(request.param)
    (_llama() if request.param == "llama" else _gpt2()).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # no weights anywhere
    return request.param, str(folder)


def _loaded_trainable(folder: str, method: str, options: dict) -> int:
    """get_nb_trainable_parameters of the real setup: weights materialized on CPU, the adapter attached."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    if method == "full":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "qlora":
        from deltatune.quant.convert import quantize_model

        quantize_model(model, bits=4, quant_type="nf4")
    return get_peft_model(model, method_config(method, options)).get_nb_trainable_parameters()[0]


CASES = [
    ("full", {}), ("lora", {}), ("lora", {"r": 4, "target_modules": "__qv__"}), ("qlora", {}), ("ia3", {}),
    ("prompt", {}), ("ptuning", {}), ("prefix", {}), ("bottleneck", {}),
]


@pytest.mark.parametrize(("method", "options"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_trainable_params_equal_the_loaded_setup(arch, method, options):
    name, folder = arch
    options = dict(options)
    if options.get("target_modules") == "__qv__":
        options["target_modules"] = ["q_proj", "v_proj"] if name == "llama" else ["c_attn"]
    if method == "bottleneck" and name == "gpt2":  # deltatune has no default bottleneck layout for GPT-2
        options["target_modules"] = ["mlp"]
    est = estimate_memory(folder, method=method, batch=1, seq=16, options=options)
    assert est.trainable_params == _loaded_trainable(folder, method, options) > 0


def test_byte_terms_follow_the_trainable_count(arch):
    _, folder = arch
    adamw = estimate_memory(folder, method="full", seq=16)
    sgd = estimate_memory(folder, method="full", seq=16, optimizer="sgd")
    n = adamw.trainable_params
    assert adamw.gradients_bytes == 4 * n and adamw.optimizer_bytes == 8 * n
    assert sgd.optimizer_bytes == 0 and sgd.gradients_bytes == 4 * n
    assert adamw.weights_bytes >= 4 * n  # fp32 weights (+ buffers such as RoPE's inv_freq)
    for est in (adamw, sgd):
        assert est.total_bytes == (est.weights_bytes + est.gradients_bytes + est.optimizer_bytes
                                   + est.activations_bytes + BASELINE_BYTES)
    lora = estimate_memory(folder, method="lora", seq=16)
    assert lora.weights_bytes > adamw.weights_bytes  # base + adapter
    assert lora.optimizer_bytes == 8 * lora.trainable_params < adamw.optimizer_bytes


def test_qlora_weights_are_about_four_bits(tmp_path):
    _llama().save_pretrained(tmp_path)
    lora, qlora = (estimate_memory(str(tmp_path), method=m, seq=16) for m in ("lora", "qlora"))
    linear = LAYERS * (H * H * 2 + H * (KV * H // HEADS) * 2 + 3 * H * INNER)  # q, o, k, v, gate, up, down
    saved = lora.weights_bytes - qlora.weights_bytes
    # each quantized weight: 4 bytes -> 0.5 byte of codes + 1 byte per 64 of double-quantized absmax (+ tiny
    # nested tables), minus the decode scratch (8 bytes per weight of the largest layer)
    expected = linear * (4 - 0.5 - 1 / 64) - 8 * H * INNER
    assert saved == pytest.approx(expected, rel=0.01)
    assert qlora.trainable_params == lora.trainable_params


def test_activation_formula_value_and_scaling(tmp_path):
    _llama().save_pretrained(tmp_path)
    folder = str(tmp_path)
    q, kv = H, KV * (H // HEADS)
    frozen = 2 * H + 3 * INNER + 2 * q + 2 * kv
    full_layer = 4 * (frozen + 3 * H + INNER)  # + the inputs of q/k/v, o, gate/up, down
    expected = int(8 * (KEPT_RSS_FACTOR * (LAYERS * full_layer + 2 * H * 4) + LOGITS_COPIES * VOCAB * 4))
    assert estimate_memory(folder, method="full", batch=1, seq=8).activations_bytes == expected
    one = estimate_memory(folder, method="lora", batch=1, seq=32).activations_bytes
    assert estimate_memory(folder, method="lora", batch=3, seq=32).activations_bytes == 3 * one
    assert estimate_memory(folder, method="lora", batch=1, seq=64).activations_bytes == 2 * one
    ckpt = estimate_memory(folder, method="lora", batch=1, seq=32, grad_checkpointing=True).activations_bytes
    assert ckpt < one
    # checkpointing keeps each layer's input and one layer's recompute, plus the same allocator share of the forward
    computed = LAYERS * full_layer + 2 * H * 4
    kept = LAYERS * H * 4 + full_layer + 2 * H * 4
    expected = int(8 * (kept + (KEPT_RSS_FACTOR - 1) * computed + LOGITS_COPIES * VOCAB * 4))
    assert estimate_memory(folder, method="full", batch=1, seq=8, grad_checkpointing=True).activations_bytes == expected


def test_prompt_tokens_lengthen_the_sequence(tmp_path):
    _llama().save_pretrained(tmp_path)
    a = estimate_memory(str(tmp_path), method="prompt", seq=32, options={"num_virtual_tokens": 8})
    b = estimate_memory(str(tmp_path), method="prompt", seq=40, options={"num_virtual_tokens": 8})
    per_token = (b.activations_bytes - a.activations_bytes) / 8
    assert a.activations_bytes == pytest.approx(per_token * 40, rel=1e-9)  # 32 + 8 virtual tokens


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (distinct storages, parameters excluded), read from the graph: saved-tensor
    hooks would switch off the LoRA nodes' rebuilt inputs (methods/lora_inputs.py)."""
    return saved_tensor_bytes(model(input_ids=ids, labels=ids).loss, exclude=model)


@pytest.mark.parametrize("method", ["full", "lora", "ia3"])
def test_layer_term_matches_autograds_saved_tensors(tmp_path, method):
    """The per-layer formula against what autograd really keeps (the logits' backward transients aside)."""
    config = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32, tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if method != "full":
        model = get_peft_model(model, method_config(method, {"dropout": 0.0} if method == "lora" else {}))
    model.train()
    ids = torch.randint(0, 32, (2, 64))
    measured = _saved_bytes(model, ids)
    est = estimate_memory(str(tmp_path), method=method, batch=2, seq=64,
                          options={"dropout": 0.0} if method == "lora" else None)
    logits = 2 * 64 * 32 * 4
    kept = (est.activations_bytes - LOGITS_COPIES * logits) / KEPT_RSS_FACTOR + logits  # saved: one logits copy
    assert kept == pytest.approx(measured, rel=0.12)


# ---- bad input ----------------------------------------------------------------------------------------------


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        estimate_memory(str(tmp_path), method="lora")
    _llama().save_pretrained(tmp_path)
    folder = str(tmp_path)
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        estimate_memory(folder, method="dora")
    for kwargs, text in (({"batch": 0}, "batch must be a positive integer"), ({"seq": -4}, "seq must be"),
                         ({"seq": 2.5}, "seq must be"), ({"optimizer": "adam"}, "unknown optimizer"),
                         ({"precision": "fp16"}, "unknown precision")):
        with pytest.raises(ValueError, match=text):
            estimate_memory(folder, **kwargs)
    with pytest.raises(ValueError, match="has no setting 'r'"):
        estimate_memory(folder, method="ia3", options={"r": 4})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        estimate_memory(folder, method="prefix", grad_checkpointing=True)
    with pytest.raises(ValueError, match="r must be"):
        estimate_memory(folder, method="lora", options={"r": 0})


def test_unreadable_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ValueError, match="config.json: not a model config"):
        estimate_memory(str(tmp_path))


def test_cli_json_and_table(tmp_path, capsys):
    _llama().save_pretrained(tmp_path / "m")
    folder = str(tmp_path / "m")
    assert main(["estimate", "--model", folder, "--method", "lora", "--batch", "2", "--seq", "32", "--r", "4",
                 "--target-modules", "q_proj,v_proj", "--optimizer", "sgd", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    est = estimate_memory(folder, method="lora", batch=2, seq=32, optimizer="sgd",
                          options={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert data["trainable_params"] == est.trainable_params == LAYERS * 4 * (2 * H + H + KV * H // HEADS)
    for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "total_bytes"):
        assert data[key] == getattr(est, key) and isinstance(data[key], int)
    out = tmp_path / "est.json"
    assert main(["estimate", "--model", folder, "--method", "full", "--grad-checkpointing", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["optimizer_bytes"] == 8 * json.loads(out.read_text())["trainable_params"]
    capsys.readouterr()
    assert main(["estimate", "--model", folder, "--method", "ia3", "--seq", "16"]) == 0
    text = capsys.readouterr().out
    assert "activations" in text and "trainable params:" in text and "total" in text


@pytest.mark.parametrize(("argv", "text"), [
    (["--model", "{empty}"], "without config.json"),
    (["--model", "{folder}", "--batch", "0"], "batch must be a positive integer"),
    (["--model", "{folder}", "--method", "ia3", "--r", "4"], "has no setting 'r'"),
    (["--model", "{folder}/nothing-here"], "does not exist"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, text):
    (tmp_path / "empty").mkdir()
    _llama().save_pretrained(tmp_path / "m")
    argv = [a.format(empty=tmp_path / "empty", folder=tmp_path / "m") for a in argv]
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltatune estimate: error:") and text in err and "\n" not in err


def test_saved_tensor_bytes_counts_each_storage_once_and_leaves_out_the_model():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    hidden = torch.tanh(layer(x))  # tanh keeps its output; the Linear keeps x (for the weight) and its weight
    out = (hidden * hidden).sum()  # mul keeps hidden twice: one storage
    assert saved_tensor_bytes(out, exclude=layer) == 2 * 4 * 8 * 4  # x and tanh's output, fp32
    assert saved_tensor_bytes(out) == 2 * 4 * 8 * 4 + 8 * 8 * 4  # and the weight
