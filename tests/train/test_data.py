"""Data files -> examples -> tokens: formats, prompt masking, truncation, and clear errors."""

from __future__ import annotations

import json

import pytest

from deltatune.train import data as D
from deltatune.train.task import builtin_splits

from .tiny import alpaca_rows, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_jsonl_csv_parquet_and_json_read_the_same_rows(tmp_path):
    import pandas as pd

    rows = alpaca_rows(5)
    write_jsonl(tmp_path / "a.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    for name in ("a.jsonl", "a.json", "a.parquet"):
        assert D.read_rows(str(tmp_path / name)) == rows
    csv_rows = D.read_rows(str(tmp_path / "a.csv"))  # CSV gives None for an empty cell
    assert [r["output"] for r in csv_rows] == [r["output"] for r in rows]


def test_format_is_guessed_from_columns():
    assert D.detect_format([{"instruction": "a", "output": "b"}], "f") == "alpaca"
    assert D.detect_format([{"messages": []}], "f") == "chat"
    assert D.detect_format([{"text": "x"}], "f") == "text"


@pytest.mark.parametrize(("content", "message"), [
    ("", "is empty"),
    ('{"text": "a"}\n{"text": broken}\n', "line 2: unreadable JSON"),
    ('[1, 2]', "list of objects"),
])
def test_bad_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / ("d.json" if content.startswith("[") else "d.jsonl")
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        D.read_rows(str(path))
    assert str(path) in str(err.value)


def test_missing_columns_name_file_and_expected_fields():
    with pytest.raises(ValueError, match=r"f\.jsonl.*needs column\(s\) \['output'\]"):
        D.detect_format([{"instruction": "a"}], "f.jsonl", "alpaca")
    with pytest.raises(ValueError, match="cannot tell the format.*instruction, output"):
        D.detect_format([{"question": "a"}], "f.jsonl")
    with pytest.raises(ValueError, match="Unknown format 'sharegpt'"):
        D.detect_format([{"text": "a"}], "f.jsonl", "sharegpt")


def test_bad_row_is_named(tok):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}]
    with pytest.raises(ValueError, match=r"f\.jsonl, row 2: field 'output' is missing"):
        D.to_examples(rows, "alpaca", tok, "f.jsonl")
    chat = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ValueError, match="row 1: the last message must have role 'assistant'"):
        D.to_examples(chat, "chat", tok, "f.jsonl")


def test_prompt_tokens_are_masked_and_response_is_learned(tok):
    rows, _ = builtin_splits(2, 1)
    examples = D.to_examples(rows, "chat", tok, "builtin")
    tokenized = D.tokenize(examples, tok, 512, "builtin")
    row, example = tokenized.rows[0], examples[0]
    prompt_len = len(D.prompt_token_ids(example, tok))
    assert row["labels"][:prompt_len] == [D.IGNORE_INDEX] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    # the learned part is the answer plus the end-of-turn token, nothing of the question
    learned = tok.decode(row["input_ids"][prompt_len:])
    assert learned == example.reference + "<|im_end|>\n"
    assert tokenized.truncated == 0


def test_truncation_is_counted_and_short_max_length_is_refused(tok):
    examples = D.to_examples([{"text": "x" * 50}, {"text": "short"}], "text", tok, "f")
    tokenized = D.tokenize(examples, tok, 20, "f")
    assert tokenized.truncated == 1
    assert [len(r["input_ids"]) for r in tokenized.rows] == [20, 6]
    alpaca = D.to_examples(alpaca_rows(1), "alpaca", tok, "f.jsonl")
    with pytest.raises(ValueError, match=r"f\.jsonl, row 1: the prompt alone is \d+ tokens"):
        D.tokenize(alpaca, tok, 10, "f.jsonl")


def test_alpaca_uses_chat_template_when_there_is_one(tok):
    example = D.to_examples([{"instruction": "Do", "input": "this", "output": "ok"}], "alpaca", tok, "f")[0]
    assert example.prompt == "<|im_start|>user\nDo\n\nthis<|im_end|>\n<|im_start|>assistant\n"
    assert example.reference == "ok"


def test_split_is_seeded_and_disjoint():
    rows = list(range(100))
    train, held = D.split_rows(rows, 10, seed=3)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
    assert D.split_rows(rows, 10, seed=3) == (train, held)
    assert len(D.split_rows(rows, 500, seed=3)[1]) == 20  # at most a fifth
