"""deltatune train --quantize nf4|fp4|int8 (QLoRA) and merging such an adapter."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import cli
from deltatune.quant import Linear4bit, Linear8bit
from deltatune.train.infer import load_adapted
from tests.train.tiny import alpaca_rows, make_tiny_model_dir, write_jsonl


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_qlora_train_then_merge_generates_like_quantized_base_plus_adapter(quantize, tmp_path, capsys):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"), tie=False)
    data = write_jsonl(str(tmp_path / "data.jsonl"), alpaca_rows(24))
    run = str(tmp_path / "run")
    assert cli.main(["train", "--model", model_dir, "--data", data, "--quantize", quantize, "--r", "4",
                     "--lr", "0.05", "--max-steps", "4", "--batch-size", "4", "--grad-accum", "1",
                     "--precision", "fp32", "--threads", "1", "--eval-size", "4", "--output", run]) == 0
    with open(f"{run}/deltatune_run.json", encoding="utf-8") as fh:
        assert json.load(fh)["quantize"] == quantize

    peft_model, tokenizer = load_adapted(run)  # rebuilds the quantized base the adapter learned beside
    kind = Linear8bit if quantize == "int8" else Linear4bit
    assert any(isinstance(m, kind) for m in peft_model.modules())
    if kind is Linear4bit:
        assert {m.weight.quant_type for m in peft_model.modules() if isinstance(m, kind)} == {quantize}
    out = str(tmp_path / "merged")
    assert cli.main(["merge", "--adapter", run, "--output", out, "--requantize", quantize]) == 0
    assert "relative RMS error" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in merged.modules())
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)(
        "<|im_start|>user\nSay blue<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]])
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        assert torch.equal(merged.generate(input_ids=ids, **greedy), peft_model.generate(input_ids=ids, **greedy))
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-4)
    from deltatune.quant import load_quantized, quantize_arguments

    again = load_quantized(out, **quantize_arguments(quantize))  # the re-quantized export
    assert any(isinstance(m, kind) for m in again.modules())
    with torch.no_grad():
        drift = (again(ids).logits - merged(ids).logits).norm() / merged(ids).logits.norm()
    assert 0 < drift < 0.5  # rounding moves the outputs (tiny random model: ~0.3), unrelated outputs give ~1.4


def test_unknown_quantize_is_refused():
    from deltatune.train.config import TrainConfig

    with pytest.raises(ValueError, match="quantize 'fp3'"):
        TrainConfig(quantize="fp3")
