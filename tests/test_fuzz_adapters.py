"""Fuzzed adapter folders: every load ends in success or one clear error, never a crash, a hang or a changed model.

A valid adapter folder is mutated at random (seeded): the safetensors file cut at any byte, replaced by random
bytes, its header or data bytes flipped, tensors of the wrong dtype or shape, keys added (also ones naming base
weights) or removed, NaN/Inf values; the config cut, replaced by other JSON values, fields given wrong types, huge,
negative or non-finite numbers, strings for numbers, unknown keys and peft_types. Each case is loaded with
``PeftModel.from_pretrained``, ``load_adapter`` or ``LoraConfig.from_pretrained``.

The allowed outcomes:
* success; the base model is then unchanged after ``unload()`` (or ``delete_adapter``), apart from base weights a
  warning named as replaced, and requires_grad flags, which ``from_pretrained`` freezes as PEFT does;
* exactly ``ValueError`` (bad content) or ``FileNotFoundError`` (a file missing), with the case folder's path in
  the message, and the model exactly as it was (``tests.test_safety.snapshot``).
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
import signal
import struct
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import deltatune as dt
from deltatune.adapter_layer import replace_module
from tests.conftest import make_model, perturb
from tests.test_safety import assert_unchanged, snapshot

CASES = 300
ALLOWED = (ValueError, FileNotFoundError)
SECONDS_PER_CASE = 10.0

VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 3, 2**40, 2**64, 1.5, -0.5, math.nan, math.inf, -math.inf, "16", "", "abc",
    "q_proj", "all-linear", "([", "LORA", [], [1], ["q_proj"], ["nope"], ["q_proj", 3], [[1, 2]], {},
    {"q_proj": 2}, {"q_proj": 2**40}, {"a": "b"}, {"(": 1}, {"q_proj": math.nan},
]
FIELDS = [
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "fan_in_fan_out", "use_rslora",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "modules_to_save", "task_type", "inference_mode", "base_model_name_or_path", "revision", "peft_type",
    "use_dora", "layer_replication", "runtime_config", "auto_mapping", "peft_version", "megatron_config",
    "loftq_config", "eva_config", "trainable_token_indices", "alora_invocation_tokens", "qalora_group_size",
]
BASE_KEYS = [
    "base_model.model.model.layers.0.mlp.down_proj.weight", "base_model.model.model.norm.weight",
    "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight",
    "base_model.model.model.layers.1.self_attn.q_proj.weight", "base_model.model.model.layers.0.self_attn.q_proj.bias",
    "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", "something.else",
]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.bool, torch.uint8]


class _Hang(BaseException):
    """Raised by the per-case alarm; a BaseException so that no ``except Exception`` can turn it into a ValueError."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt a case that runs past ``seconds`` (where the platform has interval timers)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise _Hang(f"case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- building a case -----------------------------------------------------------------------------------------------

def template(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A valid adapter (r=4 on q_proj and v_proj of the tiny Llama): its config dict and tensors."""
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                                   "v_proj"]))
    perturb(model)
    model.save_pretrained(folder)
    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


def mutate_tensors(rng: random.Random, tensors: dict[str, torch.Tensor]) -> tuple[str, bytes | None]:
    """One change to the weights; returns its description and the file's bytes (None: no file)."""
    kind = rng.choice(["truncate", "random bytes", "flip header", "flip data", "dtype", "shape", "extra key",
                       "missing key", "non-finite", "empty dict", "no file", "empty file"])
    key = rng.choice(sorted(tensors))
    raw = save(tensors)
    if kind == "truncate":
        return kind, raw[:rng.randrange(len(raw))]
    if kind == "random bytes":
        return kind, rng.randbytes(rng.randrange(1, 300))
    if kind in ("flip header", "flip data"):
        header_end = 8 + struct.unpack("<Q", raw[:8])[0]
        lo, hi = (0, header_end) if kind == "flip header" else (header_end, len(raw))
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(lo, hi)] = rng.randrange(256)
        return kind, bytes(data)
    if kind == "no file":
        return kind, None
    if kind == "empty file":
        return kind, b""
    changed = dict(tensors)
    if kind == "dtype":
        changed[key] = tensors[key].to(rng.choice(DTYPES))
    elif kind == "shape":
        changed[key] = torch.randn([rng.randrange(0, 40) for _ in range(rng.randint(1, 3))])
    elif kind == "extra key":
        name = rng.choice(BASE_KEYS)
        like = {"down_proj.weight": (32, 48), "norm.weight": (32,), "embed_tokens.weight": (96, 32),
                "lm_head.weight": (96, 32), "q_proj.weight": (32, 32), "lora_A.weight": (4, 32)}
        shape = next((s for suffix, s in like.items() if name.endswith(suffix)), (3,))
        changed[name] = torch.randn(shape) if rng.random() < 0.8 else torch.randn(5, 5)
        key = name
    elif kind == "missing key":
        del changed[key]
    elif kind == "non-finite":
        changed[key] = tensors[key].clone()
        changed[key].view(-1)[rng.randrange(tensors[key].numel())] = rng.choice([math.nan, math.inf, -math.inf])
    elif kind == "empty dict":
        changed = {}
    return f"{kind} {key}", save(changed)


def mutate_config(rng: random.Random, config: dict[str, Any]) -> tuple[str, bytes | None]:
    """One change to adapter_config.json; returns its description and the file's bytes (None: no file)."""
    kind = rng.choice(["truncate", "other JSON", "field", "field", "field", "two fields", "drop field",
                       "unknown key", "no file", "not UTF-8", "random bytes"])
    text = json.dumps(config)
    if kind == "truncate":
        return kind, text[:rng.randrange(len(text))].encode()
    if kind == "other JSON":
        return kind, json.dumps(rng.choice([[1, 2], 3, "LORA", None, True, [config]])).encode()
    if kind == "no file":
        return kind, None
    if kind == "not UTF-8":
        return kind, text.encode("utf-16")
    if kind == "random bytes":
        return kind, rng.randbytes(rng.randrange(1, 200))
    changed = dict(config)
    if kind == "drop field":
        field = rng.choice(sorted(changed))
        del changed[field]
    elif kind == "unknown key":
        field = f"new_field_{rng.randrange(100)}"
        changed[field] = rng.choice(VALUES)
    else:
        fields = rng.sample(FIELDS, 2 if kind == "two fields" else 1)
        for field in fields:
            changed[field] = rng.choice(VALUES)
        field = ",".join(fields)
    return f"{kind} {field}", json.dumps(changed).encode()  # bare NaN/Infinity, as a careless writer leaves them


def write_case(rng: random.Random, folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """A mutated adapter folder: the weights, the config or both changed."""
    folder.mkdir()
    what = rng.choice(["weights", "config", "both"])
    weights_desc, weights = mutate_tensors(rng, tensors) if what != "config" else ("", save(tensors))
    config_desc, config_bytes = mutate_config(rng, config) if what != "weights" else ("", json.dumps(config).encode())
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    if config_bytes is not None:
        (folder / "adapter_config.json").write_bytes(config_bytes)
    return f"{weights_desc} | {config_desc}"


# ---- running a case ------------------------------------------------------------------------------------------------

def replaced_keys(caught: list[warnings.WarningMessage]) -> set[str]:
    """Base-model state-dict keys that a "replaces base model weights" warning listed."""
    keys: set[str] = set()
    for w in caught:
        text = str(w.message)
        if "replaces base model weights" in text:
            for key in ast.literal_eval(text[text.rindex("["):]):
                keys.add(key.removeprefix("base_model.model.").replace(".base_layer.", "."))
    return keys


def restore_modules_to_save(model: torch.nn.Module, before: Any, loaded: Any) -> None:
    """``unload()`` keeps a modules_to_save copy in the original's place (PEFT's rule): put the original back."""
    names = getattr(loaded, "modules_to_save", None) or []
    for name, module in before.modules.items():
        if name and any(name == n or name.endswith("." + n) for n in names) and dict(model.named_modules()).get(
                name) is not module:
            replace_module(model, name, module)


def check_failure(err: BaseException, folder: Path, desc: str) -> None:
    assert type(err) in ALLOWED, f"{desc}: {type(err).__name__}: {err}"
    assert str(folder) in str(err), f"{desc}: the error does not name the folder: {err}"


def run_from_pretrained(base: torch.nn.Module, folder: Path, desc: str) -> str:
    before = snapshot(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loaded = dt.PeftModel.from_pretrained(base, folder)
        except BaseException as err:
            check_failure(err, folder, desc)
            assert_unchanged(base, before)
            return type(err).__name__
        config = loaded.peft_config["default"]
        assert loaded.unload() is base
    restore_modules_to_save(base, before, config)
    for name, param in base.named_parameters(remove_duplicate=False):  # from_pretrained froze them, as PEFT does
        param.requires_grad_(before.requires_grad[name])
    assert_unchanged(base, before, allow_values=tuple(replaced_keys(caught)))
    return "success"


def run_load_adapter(host: dt.PeftModel, folder: Path, desc: str) -> str:
    before = snapshot(host)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            host.load_adapter(folder, adapter_name="fuzz")
        except BaseException as err:
            check_failure(err, folder, desc)
            assert_unchanged(host, before)
            return type(err).__name__
        host.delete_adapter("fuzz")
    allowed = tuple(f"base_model.model.{key}" for key in replaced_keys(caught))
    allowed += tuple(k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias") for k in allowed)
    assert_unchanged(host, before, allow_values=allowed)
    return "success"


def run_config(folder: Path, desc: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dt.LoraConfig.from_pretrained(folder)
        except BaseException as err:
            check_failure(err, folder, desc)
            return type(err).__name__
    return "success"


def test_fuzzed_adapter_folders_load_or_fail_cleanly(tmp_path, capsys):
    rng = random.Random(0)
    config, tensors = template(tmp_path / "template")
    base = make_model("llama")
    for i, param in enumerate(base.parameters()):
        param.requires_grad_(i % 3 == 0)
    host = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"],
                                                               modules_to_save=["lm_head"])).eval()
    runners: list[Callable[[Path, str], str]] = [
        lambda folder, desc: run_from_pretrained(base, folder, desc),
        lambda folder, desc: run_load_adapter(host, folder, desc),
        run_config,
    ]
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    for i in range(CASES):
        folder = tmp_path / f"case{i}"
        desc = f"case {i} ({write_case(rng, folder, config, tensors)})"
        begin = time.monotonic()
        with time_limit(SECONDS_PER_CASE):
            outcomes[runners[i % len(runners)](folder, desc)] += 1
        assert time.monotonic() - begin < SECONDS_PER_CASE, desc
    assert capsys.readouterr() == ("", "")  # nothing printed
    assert outcomes["success"] >= 20 and outcomes["ValueError"] >= 100 and outcomes["FileNotFoundError"] >= 10, outcomes
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("cut", [0, 7, 8, 9, 50, 100, 200, 400, 800])
def test_truncated_weights_at_fixed_offsets(tmp_path, cut):
    config, tensors = template(tmp_path / "template")
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    raw = save(tensors)
    (folder / "adapter_model.safetensors").write_bytes(raw[:cut])
    base = make_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError, match=re.escape(str(folder))):
        dt.PeftModel.from_pretrained(base, folder)
    assert_unchanged(base, before)
    save_file(tensors, folder / "adapter_model.safetensors")  # and the whole file loads
    dt.PeftModel.from_pretrained(base, folder)
