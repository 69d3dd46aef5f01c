"""The command line: every command maps to one library call; errors are one line and exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

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
    assert set(cli.COMMANDS) == {"train", "generate", "chat", "evaluate", "merge", "merge-adapters", "inspect",
                                 "analyze", "estimate"}
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


# ---- bad input is one line and exit code 2, never a traceback (issue 10) ---------------------------------------------

def one_error_line(capsys, command: str) -> str:
    """The error the last command printed: exactly one line, `deltatune <command>: error: ...`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("deltatune ")]
    assert len(lines) == 1 and lines[0].startswith(f"deltatune {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def adapter_copy(trained, tmp_path, change=None, name="adapter") -> str:
    """A copy of the trained adapter folder, its adapter_config.json changed by ``change(dict)`` when given."""
    import shutil

    folder = str(tmp_path / name)
    shutil.copytree(trained[2], folder)
    if change is not None:
        path = os.path.join(folder, "adapter_config.json")
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(change(config), fh)
    return folder


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: [c], r"adapter_config.json must hold a JSON object, found list"),
    (lambda c: {**c, "lora_alpha": "16"}, r"adapter_config.json: lora_alpha must be a number, got '16'"),
    (lambda c: {**c, "target_modules": 5}, r"adapter_config.json: target_modules=5 must be a list of module names"),
    (lambda c: {**c, "r": -1}, r"adapter_config.json: r must be a positive integer"),
])
@pytest.mark.parametrize("command", ["inspect", "generate", "merge"])
def test_bad_adapter_configs_are_one_line_naming_the_file(trained, tmp_path, capsys, change, message, command):
    folder = adapter_copy(trained, tmp_path, change)
    argv = {"inspect": ["inspect", folder], "generate": ["generate", "--adapter", folder, "hi"],
            "merge": ["merge", "--adapter", folder, "--output", str(tmp_path / "merged")]}[command]
    assert cli.main(argv) == 2
    assert re.search(f"{folder}/{message}", one_error_line(capsys, command))
    assert not os.path.exists(tmp_path / "merged")


def test_adapter_config_that_is_not_json_names_the_file(trained, tmp_path, capsys):
    folder = adapter_copy(trained, tmp_path)
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as fh:
        fh.write('{"peft_type": "LORA",')
    for argv, command in ((["inspect", folder], "inspect"), (["generate", "--adapter", folder, "hi"], "generate")):
        assert cli.main(argv) == 2
        assert f"{folder}/adapter_config.json is not valid JSON (line 1" in one_error_line(capsys, command)


def test_inspect_on_a_corrupt_safetensors_file(trained, tmp_path, capsys):
    folder = adapter_copy(trained, tmp_path)
    weights = os.path.join(folder, "adapter_model.safetensors")
    with open(weights, "rb") as fh:
        data = fh.read()
    for damaged in (data[:100], b"\xff" * 64, data[:8] + b"{not json" + data[17:]):
        with open(weights, "wb") as fh:
            fh.write(damaged)
        assert cli.main(["inspect", folder]) == 2
        assert f"{weights} is not a readable safetensors file" in one_error_line(capsys, "inspect")


@pytest.mark.parametrize("record", ["[1, 2]", "{\"quantize\": \"nf5\"}", "{\"quantize\": NaN}", "not json"])
def test_bad_run_record_is_one_line_naming_the_file(trained, tmp_path, capsys, record):
    folder = adapter_copy(trained, tmp_path)
    with open(os.path.join(folder, "deltatune_run.json"), "w", encoding="utf-8") as fh:
        fh.write(record)
    assert cli.main(["generate", "--adapter", folder, "hi"]) == 2
    assert f"{folder}/deltatune_run.json" in one_error_line(capsys, "generate")


@pytest.mark.parametrize(("flags", "message"), [
    (["--threads", "-1"], "threads must be a positive integer, got -1"),
    (["--target-modules", "(["], "target_modules='\\(\\[' is not a valid regular expression"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--alpha", "nan"], "alpha must be a finite number"),
    (["--alpha", "inf"], "alpha must be a finite number"),
    (["--dropout", "nan"], "dropout must be a finite number"),
])
def test_bad_train_flags_are_refused_before_loading(trained, tmp_path, capsys, monkeypatch, flags, message):
    from deltatune.train import run as runmod

    monkeypatch.setattr(runmod, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    model_dir, data, _ = trained
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "o"), *flags]) == 2
    assert re.search(message, one_error_line(capsys, "train"))


def test_yaml_number_in_quotes_is_an_error_and_1e_minus_3_is_a_number(trained, tmp_path, capsys):
    model_dir, data, _ = trained
    path = tmp_path / "run.yaml"
    path.write_text('alpha: "16"\n')
    argv = ["train", "--model", model_dir, "--data", data, "--config", str(path), "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "alpha must be a number, got the text '16' (in a YAML file" in one_error_line(capsys, "train")
    path.write_text("lr: 1e-3\nmax_steps: 1\nthreads: 1\neval_size: 0\nprecision: fp32\n")
    assert cli.main(argv) == 0
    with open(tmp_path / "o" / "adapter_config.json", encoding="utf-8") as fh:
        assert json.load(fh)["peft_type"] == "LORA"


def test_output_under_a_file_is_one_line(trained, tmp_path, capsys):
    model_dir, data, run = trained
    (tmp_path / "file").write_text("x")
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "file" / "o")]) == 2
    assert "which is a file, not a folder" in one_error_line(capsys, "train")
    assert cli.main(["merge", "--adapter", run, "--output", str(tmp_path / "file" / "o")]) == 2
    assert "which is a file, not a folder" in one_error_line(capsys, "merge")


def test_gguf_cut_inside_its_header_is_one_line(trained, tmp_path, capsys):
    from tests.train.tiny import gguf_header_size, write_tiny_gguf

    model_dir, data, _ = trained
    (tmp_path / "models").mkdir()
    whole = write_tiny_gguf(str(tmp_path / "models" / "whole.gguf"), model_dir)
    cut = tmp_path / "models" / "cut.gguf"
    with open(whole, "rb") as fh:
        cut.write_bytes(fh.read()[:gguf_header_size(whole) // 2])
    assert cli.main(["train", "--model", str(cut), "--data", data, "--output", str(tmp_path / "o")]) == 2
    assert f"{cut}: not a readable GGUF file" in one_error_line(capsys, "train")


def test_rank_too_large_is_one_line(trained, tmp_path, capsys, monkeypatch):
    from deltatune.train import run as runmod

    monkeypatch.setattr(runmod, "get_peft_model", lambda *a, **k: pytest.fail("allocated the adapter"))
    model_dir, data, _ = trained
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(tmp_path / "o"),
                     "--r", "100000000000", "--threads", "1"]) == 2
    assert "Choose a smaller --r" in one_error_line(capsys, "train")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", b'{"instruction": "a", "output": "\xff\xfe"}\n', "bad.jsonl could not be read as JSON: it is not"),
    ("bad.csv", b'instruction,output\n"a,b\n', "bad.csv"),
    ("bad.csv", b"instruction,output\nx," + b"y" * 200_000 + b"\n", "bad.csv, line"),
    ("bad.json", b'[{"instruction": "a", "output": "b"}', "bad.json, line 1: unreadable JSON"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "deep.json"),
    ("big.jsonl", b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}\n", "big.jsonl, line 1"),
])
def test_bad_data_files_name_the_file(trained, tmp_path, capsys, name, content, message):
    model_dir, _, _ = trained
    path = tmp_path / name
    path.write_bytes(content)
    assert cli.main(["train", "--model", model_dir, "--data", str(path), "--output", str(tmp_path / "o")]) == 2
    assert message in one_error_line(capsys, "train")


def test_debug_shows_the_traceback(trained, tmp_path, monkeypatch):
    model_dir, data, _ = trained
    argv = ["train", "--model", model_dir, "--data", data, "--threads", "-1", "--output", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        cli.main([*argv, "--debug"])
    monkeypatch.setenv("DELTATUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        cli.main(argv)


def test_a_real_process_prints_one_line_and_exits_2(trained, tmp_path):
    model_dir, data, _ = trained
    result = subprocess.run([sys.executable, "-m", "deltatune", "train", "--model", model_dir, "--data", data,
                             "--lr", "inf", "--output", str(tmp_path / "o")], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("deltatune train: error: lr must be a finite number, got inf "
                                                      "(NaN and infinity make the run's weights or length "
                                                      "meaningless).")
    assert "Traceback" not in result.stderr


# ---- merge writes nothing it should not ------------------------------------------------------------------------------

def digest(folder) -> dict[str, bytes]:
    import hashlib

    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).digest()
            for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("inside", ["", "merged"])
def test_merge_into_the_base_model_folder_is_refused(trained, capsys, inside):
    """It used to replace the base model.safetensors with the merged one, exit 0."""
    model_dir, _, run = trained
    before = digest(model_dir)
    assert cli.main(["merge", "--adapter", run, "--output", os.path.join(model_dir, inside), "--overwrite"]) == 2
    assert "is the base model's folder" in one_error_line(capsys, "merge")
    assert digest(model_dir) == before


def test_merge_refuses_an_output_holding_a_model_unless_overwrite(trained, tmp_path, capsys):
    _, _, run = trained
    out = str(tmp_path / "merged")
    assert cli.main(["merge", "--adapter", run, "--output", out]) == 0
    before = digest(out)
    assert cli.main(["merge", "--adapter", run, "--output", out, "--dtype", "bfloat16"]) == 2
    assert "already holds config.json, model.safetensors" in one_error_line(capsys, "merge")
    assert digest(out) == before
    assert cli.main(["merge", "--adapter", run, "--output", out, "--dtype", "bfloat16", "--overwrite"]) == 0
    assert digest(out)["model.safetensors"] != before["model.safetensors"]
    assert cli.main(["merge", "--adapter", run, "--output", run, "--overwrite"]) == 2
    assert "is the adapter folder" in one_error_line(capsys, "merge")


def test_merge_of_a_nan_adapter_exits_2_and_writes_nothing(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = adapter_copy(trained, tmp_path)
    weights = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(weights)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    out = tmp_path / "merged"
    with pytest.warns(UserWarning, match="hold NaN or Inf"):  # loading warns, naming the tensor
        assert cli.main(["merge", "--adapter", folder, "--output", str(out)]) == 2
    assert "gives NaN/Inf; nothing was merged" in one_error_line(capsys, "merge")
    assert not out.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--temperature", "nan", "hi"], "--temperature must be a finite number >= 0"),
    (["generate", "--temperature", "-1", "hi"], "--temperature must be a finite number >= 0"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens must be a positive integer, got 0"),
    (["chat", "--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["evaluate", "--data", "DATA", "--max-length", "0"], "--max-length must be an integer >= 8, got 0"),
])
def test_generation_settings_are_refused_before_loading(trained, capsys, monkeypatch, argv, message):
    """A NaN or negative temperature used to mean greedy decoding, without a word."""
    from deltatune.train import infer

    monkeypatch.setattr(infer, "load_adapted", lambda *a, **k: pytest.fail("loaded the model"))
    command = argv[0]
    argv = [a.replace("DATA", trained[1]) for a in argv]
    assert cli.main([command, "--adapter", trained[2], *argv[1:]]) == 2
    assert message in one_error_line(capsys, command)
