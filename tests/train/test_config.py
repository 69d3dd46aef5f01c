"""TrainConfig: bad settings are refused before any work; YAML is read, flags win over it."""

from __future__ import annotations

import pytest

from deltatune.train.config import TrainConfig, config_from_sources


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -4}, "r must be a positive integer"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"lr": -1e-3}, "lr must be > 0"),
    ({"max_length": 4}, "max_length must be an integer >= 8"),
    ({"format": "sharegpt"}, "Unknown format 'sharegpt'"),
    ({"method": "dora"}, "Unknown method 'dora'"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"dropout": 1.0}, "dropout must be in"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_data_file_must_exist_and_have_a_known_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl' does not exist"):
        TrainConfig(data=str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported suffix"):
        TrainConfig(data=str(tmp_path / "d.txt"))


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("r: 4\nlr: 0.01\ngrad-accum: 2\ntarget_modules: q_proj,v_proj\n")
    config = config_from_sources(str(path), {"lr": 0.002, "r": None})
    assert (config.r, config.lr, config.grad_accum) == (4, 0.002, 2)
    assert config.target_modules == ["q_proj", "v_proj"]


def test_yaml_unknown_key_and_bad_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rank: 4\n")
    with pytest.raises(ValueError, match=r"unknown settings \['rank'\]"):
        config_from_sources(str(path), {})
    path.write_text("r: [1,\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        config_from_sources(str(path), {})
    with pytest.raises(FileNotFoundError):
        config_from_sources(str(tmp_path / "missing.yaml"), {})
