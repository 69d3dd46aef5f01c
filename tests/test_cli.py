"""The command line: every command maps to one library call; errors are one line and exit code 2."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import cli
from deltatune.train.infer import load_adapted
from tests.train.tiny import alpaca_rows, make_tiny_model_dir, write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model and an adapter trained on it through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = make_tiny_model_dir(str(root / "model"))
    data = write_jsonl(str(root / "data.jsonl"), alpaca_rows(40))
    yaml_path = root / "run.yaml"
    yaml_path.write_text("r: 4\nalpha: 8\nlr: 0.05\nmax_steps: 12\nbatch_size: 4\nprecision: fp32\nthreads: 1\n")
    code = cli.main(["train", "--model", model_dir, "--data", data, "--config", str(yaml_path), "--r", "2",
                     "--eval-size", "4", "--output", str(root / "run")])
    assert code == 0
    return model_dir, data, str(root / "run")


def test_every_command_is_in_the_table():
    assert set(cli.COMMANDS) == {"train", "generate", "chat", "evaluate", "merge", "inspect"}
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--r", "4", "--target-modules", "q_proj,v_proj", "--resume"])
    assert (args.r, args.target_modules, args.resume, args.lr) == (4, "q_proj,v_proj", True, None)


def test_flags_win_over_yaml_and_inspect_reports(trained, capsys):
    _, _, run = trained
    assert cli.main(["inspect", run, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"], info["rank"], info["alpha"]) == ("LORA", 2, 8)  # --r 2 beat r: 4 from the YAML
    assert info["base_model"] == trained[0]
    # all-linear on a 2-layer Llama: 7 Linear layers per block, A (r x in) + B (out x r) each
    assert info["adapted_modules"] == 14 and info["tensors"] == 28
    assert info["parameters"] == 2 * 2 * (32 + 32 + 32 + 16 + 32 + 16 + 32 + 32 + 32 + 64 + 32 + 64 + 64 + 32)
    assert info["file_bytes"] == os.path.getsize(os.path.join(run, "adapter_model.safetensors"))
    assert cli.main(["inspect", run]) == 0
    assert "rank" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--r", "0"], "r must be a positive integer"),
    (["train", "--lr", "0"], "lr must be > 0"),
    (["train", "--model", "/no/such/model"], "does not exist"),
    (["train", "--data", "/no/such.jsonl"], "does not exist"),
    (["inspect", "/no/such/adapter"], "is not an adapter folder"),
    (["generate", "--adapter", "/no/such/adapter", "hi"], "is not an adapter folder"),
])
def test_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_empty_data_file_is_named(tmp_path, capsys, trained):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["train", "--model", trained[0], "--data", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert f"{empty} is empty" in capsys.readouterr().err


def test_generate_and_evaluate_use_the_base_model_recorded_in_the_adapter(trained, capsys):
    model_dir, data, run = trained
    peft_model, tokenizer = load_adapted(run)
    assert cli.main(["generate", "--adapter", run, "--max-new-tokens", "5", "Say red"]) == 0
    printed = capsys.readouterr().out.strip()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say red"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([ids])
    out = peft_model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert printed == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert cli.main(["evaluate", "--adapter", run, "--data", data]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 40 and 0.0 <= report["exact_match"] <= 1.0 and report["loss"] > 0


def test_merge_gives_a_plain_model_that_generates_like_base_plus_adapter(trained, tmp_path):
    _, _, run = trained
    out = str(tmp_path / "merged")
    assert cli.main(["merge", "--adapter", run, "--output", out]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    peft_model, _ = load_adapted(run)
    ids = torch.tensor([tokenizer("<|im_start|>user\nSay blue<|im_end|>\n<|im_start|>assistant\n",
                                  add_special_tokens=False)["input_ids"]])
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        assert torch.equal(merged.generate(input_ids=ids, **greedy), peft_model.generate(input_ids=ids, **greedy))


def test_chat_reads_until_exit(trained):
    _, _, run = trained
    from deltatune.train.infer import chat

    lines, said = iter(["Say red", "/reset", "Say blue", "exit"]), []
    chat(run, read=lambda _: next(lines), write=said.append, max_new_tokens=4)
    assert len([s for s in said if s.startswith("model> ")]) == 2
