"""Seeded fuzz of the command side: damaged data files, bad flags and bad YAML end in success or one clean error.

Every case goes through what ``deltatune train`` runs before it loads a model: reading and checking a data file
(``train/data.py``: read, format, render, tokenize), or parsing the flags and a YAML file into a ``TrainConfig``
and checking the output folder. Each must either work or raise one of ``cli.USER_ERRORS`` (what the command
line shows as one ``error:`` line with exit code 2; argparse's own refusals exit 2 too), with a message that is
one line and, for a data file, names it. Never another exception, never a hang (an alarm ends the test).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import time

import pytest

from deltatune import cli
from deltatune.train import data as datamod
from deltatune.train.config import config_from_sources, field_names

from .tiny import tiny_tokenizer

SEED = 20261201
DATA_CASES = 400
FLAG_CASES = 200
YAML_CASES = 120
TEXTS = ["Say red", "", " ", "007", "1e3", "null", "NaN", "Zoë ☕", "a\nb", "<|im_end|>", "x" * 300, '"quoted"',
         "a,b", "\t"]
VALUES = [*TEXTS, 0, 42, -1.5, float("nan"), True, False, None, [], ["a"], {"a": 1}, [{"role": "user"}]]


@pytest.fixture(autouse=True)
def watchdog():
    """A hang fails the test instead of stopping the suite."""
    def hung(signum, frame):
        raise TimeoutError("a fuzz case hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def random_row(rng: random.Random) -> dict:
    """A row of one of the three formats, its fields sometimes missing, renamed or of the wrong type."""
    def value(good: object) -> object:
        return good if rng.random() < 0.75 else rng.choice(VALUES)

    kind = rng.choice(["alpaca", "chat", "text"])
    if kind == "alpaca":
        row = {"instruction": value(rng.choice(TEXTS[:3])), "input": value(""), "output": value(rng.choice(TEXTS))}
    elif kind == "chat":
        turns = [{"role": value(role), "content": value(rng.choice(TEXTS))}
                 for role in ("system", "user", "assistant")[rng.randrange(3):]]
        row = {"messages": value(turns)}
    else:
        row = {"text": value(rng.choice(TEXTS))}
    if rng.random() < 0.1 and row:
        row.pop(rng.choice(list(row)))
    if rng.random() < 0.1:
        row[rng.choice(["extra", "Output", "", "messages"])] = rng.choice(VALUES)
    return row


def serialize(rows: list[dict], suffix: str, rng: random.Random) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if suffix == ".json":
        return json.dumps(rows if rng.random() < 0.9 else rng.choice([rows[0], 5, "x", None])).encode()
    out = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r)) or ["text"]
    writer = csv.writer(out)
    writer.writerow(columns)
    for r in rows:
        writer.writerow([r.get(c, "") if not isinstance(r.get(c), list | dict) else json.dumps(r.get(c))
                         for c in columns])
    return out.getvalue().encode()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Cut, flip, insert or replace bytes: a torn write, a bad editor, the wrong file."""
    if not data:
        return data
    how = rng.randrange(6)
    at = rng.randrange(len(data))
    if how == 0:
        return data[:at]
    if how == 1:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if how == 2:
        return data[:at] + rng.choice([b"\xff", b"\x00", b'"', b",", b"\n", b"[", b"}", b"\xc3", b"\r", b"\\"]) + \
            data[at:]
    if how == 3:
        return data[:at] + data[at + rng.randint(1, 20):]
    if how == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    return b"\xef\xbb\xbf" + data  # a byte-order mark


def assert_clean(err: BaseException, name: str | None = None) -> None:
    assert isinstance(err, cli.USER_ERRORS), f"{type(err).__name__}: {err}"
    text = str(err)
    assert text.strip(), f"empty message from {type(err).__name__}"
    if name is not None:
        assert name in text, f"the message does not name the file: {text}"


def test_damaged_data_files_end_in_rows_or_one_clean_error(tmp_path):
    rng = random.Random(SEED)
    tokenizer = tiny_tokenizer()
    outcomes = {"ok": 0, "error": 0}
    started = time.time()
    for case in range(DATA_CASES):
        suffix = rng.choice([".jsonl", ".json", ".csv"])
        rows = [random_row(rng) for _ in range(rng.randint(1, 6))]
        content = serialize(rows, suffix, rng)
        if rng.random() < 0.6:
            for _ in range(rng.randint(1, 3)):
                content = mutate(content, rng)
        path = tmp_path / f"case{case}{suffix}"
        path.write_bytes(content)
        try:
            read = datamod.read_rows(str(path))
            fmt = datamod.detect_format(read, str(path), rng.choice([None, None, "alpaca", "chat", "text"]))
            examples = datamod.to_examples(read, fmt, tokenizer, str(path))
            tokenized = datamod.tokenize(examples, tokenizer, rng.choice([8, 16, 64, 256]), str(path))
            assert len(tokenized.rows) == len(read)
            outcomes["ok"] += 1
        except Exception as err:  # noqa: BLE001 - the point: which exceptions come out
            assert_clean(err, path.name)
            assert "\n" not in str(err).strip() or "unreadable" in str(err), str(err)
            outcomes["error"] += 1
    assert outcomes["ok"] > 10 and outcomes["error"] > 60, outcomes  # both paths were exercised
    assert time.time() - started < 60


# ---- flags and YAML --------------------------------------------------------------------------------------------------

BAD_VALUES = ["nan", "inf", "-inf", "-1", "0", "1", "2.5", "1e-3", "1e400", "abc", "", " ", "([", "q_proj,,v_proj",
              "all-linear", "99999999999999999999", "Zoë", "-0", "0x10", "1_000", "True", "None", "8", "16", "0.05"]


def flag_value(flag: str, options: dict, rng: random.Random, paths: dict[str, str]) -> list[str]:
    if options.get("action") == "store_true":
        return [flag]
    if flag in ("--model", "--data", "--eval-data", "--output", "--config") and rng.random() < 0.7:
        return [flag, rng.choice(list(paths.values()))]
    if "choices" in options and rng.random() < 0.5:
        return [flag, rng.choice(options["choices"])]
    return [flag, rng.choice(BAD_VALUES)]


def make_paths(root) -> dict[str, str]:
    (root / "dir").mkdir()
    (root / "file.txt").write_text("x")
    (root / "run").mkdir()
    (root / "run" / "adapter_config.json").write_text("{}")
    (root / "data.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (root / "empty.jsonl").write_text("")
    (root / "cfg.yaml").write_text("r: 4\nlr: 1e-3\n")
    (root / "bad.yaml").write_text("r: [\n")
    return {name: str(root / name) for name in ("dir", "file.txt", "run", "data.jsonl", "empty.jsonl", "cfg.yaml",
                                                 "bad.yaml", "missing.jsonl", "file.txt/under", "new/run")}


def settle(argv: list[str], capsys) -> str:
    """Parse ``train`` flags and build the config as the command does; returns "ok", "usage" or "error"."""
    from deltatune.train.outputs import check_output

    try:
        args = cli.build_parser().parse_args(["train", *argv])
    except SystemExit as stop:
        assert stop.code == 2  # argparse: a value of the wrong type or an unknown choice, one usage line
        capsys.readouterr()
        return "usage"
    try:
        config = config_from_sources(args.config, {name: getattr(args, name, None) for name in field_names()})
        if config.output is not None:
            check_output(config.output_dir, {}, config.overwrite, config.resume)
    except Exception as err:  # noqa: BLE001 - the point: which exceptions come out
        assert_clean(err)
        assert "\n" not in str(err), str(err)
        return "error"
    return "ok"


def test_random_bad_flags_end_in_a_config_or_one_clean_error(tmp_path, capsys):
    rng = random.Random(SEED + 1)
    paths = make_paths(tmp_path)
    outcomes = {"ok": 0, "usage": 0, "error": 0}
    for _ in range(FLAG_CASES):
        argv = []
        for flag, options in rng.sample(cli.train_flags(), rng.randint(1, 5)):
            argv += flag_value(flag, options, rng, paths)
        outcomes[settle(argv, capsys)] += 1
    assert min(outcomes.values()) > 10, outcomes
    assert sorted(os.listdir(tmp_path / "run")) == ["adapter_config.json"]  # nothing checked was changed


YAML_KEYS = [*field_names(), "grad-accum", "target-modules", "rank", "learning_rate", "1", "null"]
YAML_SCALARS = ["1e-3", "'1e-3'", '"16"', "16", "8.0", ".nan", ".inf", "-1", "0", "true", "yes", "null", "~",
                "[q_proj, v_proj]", "[1, 2]", "{a: 1}", "q_proj,v_proj", "'(['", "fp32", "nf4", "alpaca", "2E-3",
                "5e-4", "1_000", "0x10", "abc", "''", "[[[[[[[[[]]]]]]]]]", "&a [1]", "*a", "!!python/object:os.system"]


def test_random_yaml_files_end_in_a_config_or_one_clean_error(tmp_path, capsys):
    rng = random.Random(SEED + 2)
    outcomes = {"ok": 0, "error": 0}
    for case in range(YAML_CASES):
        lines = [f"{rng.choice(YAML_KEYS)}: {rng.choice(YAML_SCALARS)}" for _ in range(rng.randint(0, 5))]
        text = "\n".join(lines).encode()
        if rng.random() < 0.3:
            text = mutate(text, rng)
        if case == 0:
            text = b"r: " + b"[" * 1000 + b"]" * 1000  # deeper than the parser's recursion (slow: once)
        path = tmp_path / f"case{case}.yaml"
        path.write_bytes(text)
        try:
            config_from_sources(str(path), {})
            outcomes["ok"] += 1
        except Exception as err:  # noqa: BLE001 - the point: which exceptions come out
            assert_clean(err, path.name if "Give epochs" not in str(err) else None)
            assert "\n" not in str(err), str(err)
            outcomes["error"] += 1
    assert outcomes["ok"] > 5 and outcomes["error"] > 40, outcomes
    capsys.readouterr()
