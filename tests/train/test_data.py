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
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv"):  # an empty CSV cell is "", as in the other files
        assert D.read_rows(str(tmp_path / name)) == rows


# answers a type-guessing loader turns into dates, numbers, booleans or missing values
TRICKY_TEXT = ["2024-05-01", "42", "true", "007", "1e3", "null", "NaN", "", " padded ", 'say "hi", then\nleave']


def write_data(path, rows: list[dict]) -> str:
    """``rows`` as a JSONL, CSV (every cell quoted as the csv module does) or Parquet (string columns) file."""
    import csv

    import pandas as pd

    path = str(path)
    if path.endswith(".jsonl"):
        return write_jsonl(path, rows)
    if path.endswith(".csv"):
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path
    pd.DataFrame(rows, dtype=str).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("value", TRICKY_TEXT)
def test_text_fields_stay_text_exactly_as_written(tmp_path, tok, suffix, value):
    """A column of dates, digits, "true", "null" or "NaN" is still the text the file holds, byte for byte."""
    rows = [{"instruction": value or "q", "input": value, "output": value}] * 2
    path = write_data(tmp_path / f"d{suffix}", rows)
    read = D.read_rows(path)
    assert read == rows
    assert all(type(v) is str for row in read for v in row.values())
    assert D.to_examples(read, "alpaca", tok, path)[0].reference == value


def test_csv_cells_are_strings_and_short_rows_lack_the_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output,id\nq,,0042,7\n\nr,NA\n", encoding="utf-8")
    assert D.read_rows(str(path)) == [{"instruction": "q", "input": "", "output": "0042", "id": "7"},
                                      {"instruction": "r", "input": "NA", "output": None, "id": None}]
    path.write_text("instruction,output\nq,a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv, row 1 \(line 2\): 3 cells but the header names 2 columns"):
        D.read_rows(str(path))


def test_rows_get_every_column_of_the_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"},
                                              {"instruction": "c", "input": "d", "output": "e"}])
    assert D.read_rows(str(path)) == [{"instruction": "a", "output": "b", "input": None},
                                      {"instruction": "c", "output": "e", "input": "d"}]


@pytest.mark.parametrize(("lines", "message"), [
    (['{"instruction": "a", "output": "b"}', "", '{"instruction": "a", "output": 42}'],
     r"d\.jsonl, line 3: field 'output' is the number 42, not text; write it in quotes"),
    (['{"instruction": "a", "input": true, "output": "b"}'], r"line 1: field 'input' is the boolean true"),
    (['{"text": 1e3}'], r"line 1: field 'text' is the number 1000\.0"),
    (['{"instruction": "a", "output": -0.5}'], r"line 1: field 'output' is the number -0\.5"),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]}'],
     r"line 1: field 'messages\[2\]\.content' is the number 7"),
    (['{"messages": [{"role": false, "content": "hi"}]}'], r"line 1: field 'messages\[1\]\.role' is the boolean false"),
])
def test_json_numbers_and_booleans_in_text_fields_are_refused_with_the_line(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        D.read_rows(str(path))


def test_non_text_in_json_list_and_parquet_is_refused_with_the_row(tmp_path):
    import pandas as pd

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": False}]))
    with pytest.raises(ValueError, match=r"d\.json, row 2: field 'output' is the boolean false, not text"):
        D.read_rows(str(path))
    pd.DataFrame({"instruction": ["a", "b"], "output": [1, 42]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet, row 1: field 'output' is the number 1, not text; "
                                         r"store that column as strings"):
        D.read_rows(str(tmp_path / "d.parquet"))
    pd.DataFrame({"text": ["a", "b"], "score": [1, 2]}).to_parquet(tmp_path / "e.parquet")
    assert D.read_rows(str(tmp_path / "e.parquet")) == [{"text": "a", "score": 1}, {"text": "b", "score": 2}]


def test_parquet_null_and_nan_are_missing_values(tmp_path, tok):
    """pandas stores an all-empty column as float NaN: that is "no input", as JSON null is."""
    import pandas as pd

    path = str(tmp_path / "d.parquet")
    pd.DataFrame({"instruction": ["a", "b"], "input": [float("nan")] * 2, "output": ["x", None]}).to_parquet(path)
    rows = D.read_rows(path)
    assert D.to_examples(rows[:1], "alpaca", tok, path)[0].reference == "x"
    with pytest.raises(ValueError, match=r"d\.parquet, row 2: field 'output' is missing or empty"):
        D.to_examples(rows, "alpaca", tok, path)


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
