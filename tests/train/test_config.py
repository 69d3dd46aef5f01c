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
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
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


# ---- nothing silently wrong: non-finite and mistyped settings are refused before anything is loaded ----------------

@pytest.mark.parametrize("name", ["lr", "alpha", "dropout", "epochs"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(name, bad):
    """NaN passes every `<= 0` check; --lr inf / --alpha nan used to train to an all-NaN adapter with exit 0."""
    with pytest.raises(ValueError, match=rf"{name} must be a finite number, got -?(nan|inf)"):
        TrainConfig(**{name: bad})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"threads": -1}, "threads must be a positive integer, got -1"),
    ({"threads": 0}, "threads must be a positive integer, got 0"),
    ({"max_new_tokens": -3}, "max_new_tokens must be a positive integer"),
    ({"seed": -1}, "seed must be an integer from 0 to 2\\*\\*32 - 1"),
    ({"r": 2.5}, "r must be an integer, got 2.5"),
    ({"r": True}, "r must be an integer, got True"),
    ({"eval_size": 1.5}, "eval_size must be an integer"),
    ({"lr": "1e-3"}, "lr must be a number, got the text '1e-3' \\(in a YAML file, write numbers"),
    ({"alpha": "16"}, "alpha must be a number, got the text '16'"),
    ({"resume": "yes"}, "resume must be true or false"),
    ({"model": 5}, "model must be text, got 5"),
    ({"precision": ["fp32"]}, "precision must be text"),
    ({"quantize": "nf3"}, "Unknown quantize 'nf3'"),
    ({"target_modules": 5}, "target_modules=5 must be a list of module names"),
    ({"target_modules": ["q_proj", 3]}, "must be a list of module names"),
    ({"target_modules": "(["}, "target_modules='\\(\\[' is not a valid regular expression"),
    ({"output": ""}, "output must not be empty"),
    ({"data": ""}, "data must not be empty"),
])
def test_mistyped_and_out_of_range_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is under '.*file', which is a file, not a folder"):
        TrainConfig(output=str(tmp_path / "file" / "deeper" / "run"))


@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("5e-4", 5e-4), ("2E-3", 2e-3), ("1.0e-3", 1e-3),
                                             ("0.002", 0.002), (".5e-2", 0.005)])
def test_yaml_exponent_without_a_dot_is_a_number(tmp_path, text, value):
    """YAML 1.1 (PyYAML) reads `lr: 1e-3` as the text "1e-3"; every user means the number."""
    path = tmp_path / "run.yaml"
    path.write_text(f"lr: {text}\nalpha: 3e1\n")
    config = config_from_sources(str(path), {})
    assert config.lr == value and isinstance(config.lr, float) and config.alpha == 30.0


@pytest.mark.parametrize(("text", "message"), [
    ('alpha: "16"\n', "alpha must be a number, got the text '16'"),
    ("lr: '1e-3'\n", "lr must be a number, got the text '1e-3'"),  # quoted: text, as the file says
    ("r: 8.0\n", "r must be an integer, got 8.0"),
    ("lr: .nan\n", "lr must be a finite number, got nan"),
    ("threads: -1\n", "threads must be a positive integer, got -1"),
    ("target_modules: 5\n", "target_modules=5 must be a list"),
    ("- r: 4\n", "must hold a mapping of settings"),
    ("r: [1,\n", "not valid YAML"),
])
def test_yaml_values_of_the_wrong_type_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        config_from_sources(str(path), {})
    assert "\n" not in str(info.value)


def test_yaml_that_is_not_utf8_or_a_folder_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"lr: 0.01\nformat: \xff\xfe\n")
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text"):
        config_from_sources(str(path), {})
    with pytest.raises(ValueError, match="is not a file; give a YAML file"):
        config_from_sources(str(tmp_path), {})
