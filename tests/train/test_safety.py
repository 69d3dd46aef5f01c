"""`deltatune train` loses nothing and is never silently wrong (issue 10, the command's side).

- No run destroys files: the output folder is checked before anything is loaded or removed, the final
  adapter is on disk before the checkpoints are removed, and a torn checkpoint falls back to the one before.
- Training stops at the first NaN/Inf loss, gradient norm or weight, keeping (and naming) the last good checkpoint.
- A rank that cannot fit in memory is refused before it is allocated.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from deltatune import cli
from deltatune.train import run as runmod
from deltatune.train.config import TrainConfig
from deltatune.train.report import RunSummary, write_log
from deltatune.train.trainer import LossProgress

from .tiny import alpaca_rows, make_tiny_model_dir, write_jsonl, write_tiny_gguf

ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = make_tiny_model_dir(str(root / "model"))
    data = write_jsonl(str(root / "data.jsonl"), alpaca_rows(48))
    return model_dir, data


def settings(tiny, output, **kwargs) -> TrainConfig:
    model_dir, data = tiny
    base = dict(model=model_dir, data=data, output=str(output), max_steps=6, batch_size=4, lr=5e-3,
                eval_size=0, save_steps=2, precision="fp32", dropout=0.0, threads=1)
    return TrainConfig(**{**base, **kwargs})


def fake_checkpoint(output) -> str:
    """An earlier run's checkpoint folder, as Trainer leaves it (enough for the output checks to see it)."""
    folder = os.path.join(output, "checkpoints", "checkpoint-3")
    os.makedirs(folder)
    with open(os.path.join(folder, "trainer_state.json"), "w", encoding="utf-8") as fh:
        fh.write("{}")
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the run gets as far as loading the tokenizer or the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run loaded a model before refusing its settings")

    monkeypatch.setattr(runmod, "load_tokenizer", refuse)
    monkeypatch.setattr(runmod, "load_model", refuse)


# ---- the output folder -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("files", "found"), [
    ({"adapter_config.json": "{}", ADAPTER: ""}, "adapter_config.json, adapter_model.safetensors"),
    ({"adapter_config.json": "{}"}, "adapter_config.json"),
    ({"config.json": "{}", "model.safetensors": ""}, "config.json, model.safetensors"),
    ({"model-00001-of-00002.safetensors": ""}, "model-00001-of-00002.safetensors"),
    ({"llama.Q4_0.gguf": ""}, "llama.Q4_0.gguf"),
])
def test_output_holding_an_adapter_or_model_is_refused_before_loading(tiny, tmp_path, no_loading, files, found):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(ValueError, match=rf"already holds {found} .*pass --overwrite to replace it"):
        runmod.train(settings(tiny, out))
    assert sorted(os.listdir(out)) == sorted(files)


def test_overwrite_replaces_an_earlier_adapter(tiny, tmp_path):
    out = tmp_path / "out"
    runmod.train(settings(tiny, out, max_steps=2, lr=0.05))
    first = load_file(out / ADAPTER)
    with pytest.raises(ValueError, match="already holds"):
        runmod.train(settings(tiny, out, max_steps=2, lr=0.05, seed=1))
    assert all(torch.equal(first[k], v) for k, v in load_file(out / ADAPTER).items())
    runmod.train(settings(tiny, out, max_steps=2, lr=0.05, seed=1, overwrite=True))
    assert any(not torch.equal(first[k], v) for k, v in load_file(out / ADAPTER).items())


def test_earlier_checkpoints_are_refused_and_kept_when_a_setting_is_bad(tiny, tmp_path, no_loading):
    """A rerun without --resume used to remove them first, then fail on its own --lr nan."""
    out = tmp_path / "out"
    checkpoint = fake_checkpoint(out)
    with pytest.raises(ValueError, match=r"already holds checkpoints/ .*--overwrite to replace it, --resume to "
                                         "continue that run"):
        runmod.train(settings(tiny, out))
    model_dir, data = tiny
    assert cli.main(["train", "--model", model_dir, "--data", data, "--output", str(out), "--overwrite",
                     "--lr", "nan", "--max-steps", "1", "--threads", "1", "--eval-size", "0"]) == 2
    assert os.path.isdir(checkpoint)


def test_earlier_checkpoints_survive_a_run_that_fails_while_loading(tiny, tmp_path):
    """--overwrite removes them only once the new run's model is loaded and adapted: right before it trains."""
    out = tmp_path / "out"
    checkpoint = fake_checkpoint(out)
    with pytest.raises(ValueError, match="nope"):
        runmod.train(settings(tiny, out, overwrite=True, target_modules=["nope"]))
    assert os.path.isdir(checkpoint)


@pytest.mark.parametrize("inside", ["", "runs/x"])
def test_output_in_the_base_model_folder_is_refused(tiny, tmp_path, no_loading, inside):
    """transformers would auto-load an adapter found there together with the base, from then on."""
    model_dir = tiny[0]
    before = sorted(os.listdir(model_dir))
    with pytest.raises(ValueError, match=r"is the base model's folder .* or inside it"):
        runmod.train(settings(tiny, os.path.join(model_dir, inside), overwrite=True))
    assert sorted(os.listdir(model_dir)) == before


def test_output_beside_a_gguf_base_is_refused(tiny, tmp_path, no_loading):
    (tmp_path / "models").mkdir()
    gguf = write_tiny_gguf(str(tmp_path / "models" / "tiny.gguf"), tiny[0])
    with pytest.raises(ValueError, match=r"is the base model's folder"):
        runmod.train(settings(tiny, tmp_path / "models" / "run", model=gguf))


def test_output_that_cannot_be_written_is_refused_before_loading(tiny, tmp_path, no_loading):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="which is a file, not a folder"):
        runmod.train(settings(tiny, tmp_path / "file" / "run"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked / "run"
        if os.access(locked, os.W_OK):  # root writes anyway: use a place no one can write
            target = "/sys/deltatune-test/run" if os.path.isdir("/sys") else None
        if target is None:
            pytest.skip("no unwritable place on this machine")
        with pytest.raises(ValueError, match=r"cannot write in .*; choose a folder you can write to"):
            runmod.train(settings(tiny, target))
    finally:
        locked.chmod(0o700)


# ---- the final adapter before the checkpoints go ---------------------------------------------------------------------

def test_the_adapter_is_written_before_the_checkpoints_are_removed(tiny, tmp_path, monkeypatch):
    """A crash right after saving must leave the adapter and the checkpoints, never neither."""
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise RuntimeError("crash after the adapter was saved")

    monkeypatch.setattr(runmod, "write_run_info", crash)
    with pytest.raises(RuntimeError, match="crash"):
        runmod.train(settings(tiny, out))
    assert os.path.isfile(out / ADAPTER) and os.path.isfile(out / "adapter_config.json")
    assert os.path.isdir(out / "checkpoints" / "checkpoint-6")
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ---- resuming from a torn checkpoint ---------------------------------------------------------------------------------

class _Interrupt(LossProgress):
    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if state.global_step == 5:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    runmod.train(settings(tiny, out))
    return load_file(out / ADAPTER)


def interrupted_run(tiny, out, monkeypatch) -> str:
    """A run stopped at step 5: checkpoints 2 and 4 on disk (Trainer keeps two)."""
    monkeypatch.setattr(runmod, "LossProgress", _Interrupt)
    with pytest.raises(KeyboardInterrupt):
        runmod.train(settings(tiny, out))
    monkeypatch.setattr(runmod, "LossProgress", LossProgress)
    checkpoints = out / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-2", "checkpoint-4"]
    return str(checkpoints)


@pytest.mark.parametrize("torn", [ADAPTER, "optimizer.pt", "scheduler.pt", "trainer_state.json",
                                  "adapter_config.json"])
def test_resume_falls_back_past_a_torn_checkpoint(tiny, straight, tmp_path, monkeypatch, capsys, torn):
    out = tmp_path / "cut"
    checkpoints = interrupted_run(tiny, out, monkeypatch)
    path = os.path.join(checkpoints, "checkpoint-4", torn)
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:len(data) // 2])  # a write cut short by a crash or a full disk
    capsys.readouterr()
    summary = runmod.train(settings(tiny, out, resume=True))
    printed = capsys.readouterr().out
    assert f"{checkpoints}/checkpoint-4 is incomplete or damaged (" in printed
    assert f"); resuming from {checkpoints}/checkpoint-2 instead." in printed
    assert summary.steps == 6
    resumed = load_file(out / ADAPTER)  # the same adapter as a run never interrupted
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)


def test_resume_with_no_usable_checkpoint_is_one_clear_error(tiny, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    checkpoints = interrupted_run(tiny, out, monkeypatch)
    for step in (2, 4):
        (out / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(ValueError, match=rf"--resume: no usable checkpoint in {checkpoints} \(checkpoint-4: "
                                         r"optimizer\.pt is unreadable .*; checkpoint-2: optimizer\.pt is unreadable"
                                         r".*\)\. Start the run again with --overwrite"):
        runmod.train(settings(tiny, out, resume=True))
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-2", "checkpoint-4"]


# ---- NaN/Inf while training ------------------------------------------------------------------------------------------

class _Record(LossProgress):
    logged: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if logs and "loss" in logs:
            _Record.logged.append(logs["loss"])


def test_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    """lr 1e30 is finite but blows the weights up: the run used to log loss 0.0 and end with exit 0 (or, with
    the library's refusal, remove every checkpoint and then fail to save)."""
    out = tmp_path / "out"
    _Record.logged = []
    monkeypatch.setattr(runmod, "LossProgress", _Record)
    with pytest.raises(ValueError, match=r"^training stopped at step (\d+): .*(NaN or Inf|became (nan|inf)).*no "
                                         r"adapter was written; the last good checkpoint is kept: .*checkpoint-2\. "
                                         r"Lower --lr \(it is 1e\+30\)") as info:
        runmod.train(settings(tiny, out, lr=1e30, max_steps=8))
    step = int(info.value.args[0].split()[4].rstrip(":"))
    assert step > 2
    assert os.path.isdir(out / "checkpoints" / "checkpoint-2")
    assert not os.path.exists(out / ADAPTER) and not os.path.exists(out / "run_summary.json")
    assert 0.0 not in _Record.logged  # never a made-up zero loss
    weights = load_file(out / "checkpoints" / "checkpoint-2" / ADAPTER)
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())  # the kept checkpoint is a good one


def test_nan_loss_stops_at_once(tiny, tmp_path, monkeypatch):
    """A loss that is NaN from the first step (here: a NaN in the base's final norm) is not filtered to 0."""
    out = tmp_path / "out"
    load = runmod.load_model

    def nan_base(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        real = model.model.norm.forward
        model.model.norm.forward = lambda x: real(x) * math.nan  # weights stay finite, the loss does not
        return model, tokenizer

    monkeypatch.setattr(runmod, "load_model", nan_base)
    with pytest.raises(ValueError, match=r"^training stopped at step 1: (the training loss became nan|.*NaN or Inf)"
                                         r".*no checkpoint had been written yet"):
        runmod.train(settings(tiny, out))
    assert not os.path.exists(out / ADAPTER)


def test_run_records_never_hold_a_fake_or_non_json_loss(tmp_path):
    summary = RunSummary(str(tmp_path), "m", "d", 1, 0, 0, 3, 1, 2, final_loss=math.nan)
    write_log([{"loss": math.nan, "grad_norm": math.inf, "step": 1}, {"loss": 1.5, "step": 2}], str(tmp_path))
    summary.write()

    def strict(name):
        raise AssertionError(f"bare {name} in JSON")

    record = json.loads((tmp_path / "run_summary.json").read_text(), parse_constant=strict)
    assert record["final_loss"] is None
    lines = [json.loads(line, parse_constant=strict) for line in (tmp_path / "train_log.jsonl").read_text().split("\n")
             if line]
    assert lines == [{"loss": None, "grad_norm": None, "step": 1}, {"loss": 1.5, "step": 2}]


# ---- a rank too large ------------------------------------------------------------------------------------------------

def test_rank_too_large_for_memory_is_refused_before_allocating(tiny, tmp_path, monkeypatch):
    """Linux overcommits memory: allocating r=1e8 succeeds, then the kernel kills the process mid-way."""
    def refuse(*args, **kwargs):
        raise AssertionError("the adapter was allocated")

    monkeypatch.setattr(runmod, "get_peft_model", refuse)
    with pytest.raises(ValueError, match=r"r=10000000000 makes an adapter of [\d,]+ values over 14 layers; training "
                                         r"it needs about [\d,.]+ GiB .* Choose a smaller --r"):
        runmod.train(settings(tiny, tmp_path / "out", r=10**10))
    assert not os.path.exists(tmp_path / "out")


def test_a_non_finite_adapter_is_never_written_and_the_message_is_one_short_line(tiny, tmp_path):
    from deltatune import LoraConfig, get_peft_model
    from deltatune.formats.models import load_model, resolve_model

    model, _ = load_model(resolve_model(tiny[0]))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n)[0, 0] = math.inf
    checkpoint = fake_checkpoint(tmp_path / "out")
    with pytest.raises(ValueError, match=r"^training stopped at step 7: 1 trained tensor\(s\) hold NaN or Inf \(first: "
                                         rf".*lora_B.*\), so no adapter was written; the last checkpoint is kept: "
                                         rf"{checkpoint}\.$"):
        runmod._save_adapter(peft_model, str(tmp_path / "out"), str(tmp_path / "out" / "checkpoints"), 7)
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoints"]
