"""User data -> (prompt, response) pairs -> token ids with the prompt masked out of the loss.

Files are JSONL, JSON, CSV or Parquet. Text fields stay text exactly as the file writes them (no
date, number or boolean guessing: an answer "007" is learned as "007"), so JSON and CSV are read
with the standard library and Parquet, which stores its column types, through ``datasets``
(offline). Three formats, guessed from the columns unless given:

- alpaca: ``instruction``, optional ``input``, ``output``. Rendered through the tokenizer's chat
  template when it has one (so ``deltatune chat`` talks to the model the way it was trained),
  else with the classic Alpaca prompt.
- chat: ``messages``, a list of ``{"role", "content"}`` ending with an assistant turn; the loss
  covers the last assistant turn, the turns before it are the prompt.
- text: ``text``; the whole text is the response (no prompt).

Every row is checked before the model is loaded; an error names the file, the row (= line for
JSONL) and the fields expected.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # labels at prompt positions: the loss skips them
TEXT_FIELDS = ("instruction", "input", "output", "text")  # plus messages[].role/content
REQUIRED = {"alpaca": ("instruction", "output"), "chat": ("messages",), "text": ("text",)}
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that completes it.\n\n" \
                "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass
class Example:
    """One training pair as text. ``reference`` is the answer exact match compares with ("" for text)."""

    prompt: str
    response: str
    reference: str
    special_in_prompt: bool = False  # the chat template already wrote BOS & co into the prompt
    question: str = ""  # the user's words alone, for showing samples


@dataclass
class Tokenized:
    """Token ids for the Trainer, and how many rows were cut to max_length."""

    rows: list[dict[str, list[int]]]
    truncated: int


def read_rows(path: str) -> list[dict[str, Any]]:
    """Read a data file into a list of dicts, every text field exactly as the file writes it.

    JSONL/JSON go through the ``json`` module and CSV through the ``csv`` module (every cell a
    string, an empty cell ""), because a loader that infers column types turns an answer such as
    "2024-05-01", "42" or "true" into a date, a number or a boolean. Parquet files carry their own
    column types and are read through ``datasets`` (offline). A text field (instruction, input,
    output, text, messages[].role/content) that holds a number, boolean or other non-text value is
    refused rather than converted, since no conversion gives back what was meant ("007", "1e3").
    JSON ``null`` and a Parquet null or NaN are a missing field.

    Raises:
        ValueError: empty file, unreadable JSON or CSV (with the line), a text field that is not
            text (with the row, the line for JSONL), or a Parquet file ``datasets`` cannot parse.
    """
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty; expected at least one row.")
    suffix = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _read_json, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise ValueError(f"{path} has an unsupported suffix; expected one of {', '.join(readers)}.")
    located = readers[suffix](path)
    if not located:
        raise ValueError(f"{path} holds no rows; expected at least one.")
    for where, row in located:
        _check_text_fields(row, f"{path}, {where}", suffix)
    return _fill_columns([row for _, row in located])


def _read_text(path: str, kind: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return fh.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} could not be read as {kind}: it is not UTF-8 text ({err.reason} at byte "
                         f"{err.start}); save it as UTF-8.") from err


def _read_json(path: str) -> list[tuple[str, dict[str, Any]]]:
    """JSON rows with where each came from: "line N" for JSONL, "row N" for a JSON list."""
    text = _read_text(path, "JSON")
    if not text.strip():
        raise ValueError(f"{path} is empty; expected at least one row.")
    if path.lower().endswith(".json") or text.lstrip().startswith("["):
        data = _parse_json(text, path, 1)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a JSON list of objects (one object per row).")
        return [(f"row {number}", row) for number, row in enumerate(data, start=1)]
    located = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        obj = _parse_json(line, path, lineno)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}, line {lineno}: expected a JSON object per line, got {type(obj).__name__}.")
        located.append((f"line {lineno}", obj))
    return located


def _parse_json(text: str, path: str, first_line: int) -> Any:
    """``json.loads`` with every way it can fail as one error naming the file and the line.

    Besides malformed JSON that is nesting deeper than Python's recursion limit (RecursionError) and an
    integer with more digits than Python converts (ValueError).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {first_line + err.lineno - 1}: unreadable JSON ({err.msg}).") from err
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]
        raise ValueError(f"{path}, line {first_line}: unreadable JSON ({reason}).") from err


def _read_csv(path: str) -> list[tuple[str, dict[str, Any]]]:
    """CSV rows, every cell a string exactly as written ("" when empty); a cell past a short row's end is None."""
    reader = csv.reader(io.StringIO(_read_text(path, "CSV"), newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: the first line must name the columns; it is empty.")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise ValueError(f"{path}: column(s) {repeated} appear more than once in the header; rename them.")
        located = []
        for cells in reader:
            if not cells:  # a blank line
                continue
            number = len(located) + 1
            if len(cells) > len(header):
                raise ValueError(f"{path}, row {number} (line {reader.line_num}): {len(cells)} cells but the "
                                 f"header names {len(header)} columns; quote cells that contain commas.")
            cells = cells + [None] * (len(header) - len(cells))
            located.append((f"row {number}", dict(zip(header, cells, strict=True))))
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: unreadable CSV ({err}).") from err
    return located


def _read_parquet(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Parquet rows through ``datasets``; the file's own column types are kept (checked afterwards)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset("parquet", data_files=path, split="train")
    except Exception as err:  # datasets raises many types; the user needs the file name and the cause
        raise ValueError(f"{path} could not be read as PARQUET: {err}") from err
    return [(f"row {number}", row) for number, row in enumerate(table.to_list(), start=1)]


def _check_text_fields(row: dict[str, Any], where: str, suffix: str) -> None:
    """Refuse a non-text value in a text field: converting 42 or true back to text can only guess what was meant."""
    values = [(key, row.get(key)) for key in TEXT_FIELDS]
    messages = row.get("messages")
    if isinstance(messages, list):
        for number, turn in enumerate(messages, start=1):
            if isinstance(turn, dict):
                values += [(f"messages[{number}].{key}", turn.get(key)) for key in ("role", "content")]
    for key, value in values:
        if not _is_missing(value) and not isinstance(value, str):
            fix = "store that column as strings" if suffix == ".parquet" else "write it in quotes, as a JSON string"
            raise ValueError(f"{where}: field {key!r} is {_describe(value)}, not text; {fix} "
                             f"(text fields are learned exactly as written).")


def _is_missing(value: Any) -> bool:
    """None (JSON null, a Parquet null) or NaN (how pandas writes an empty cell to Parquet): no value."""
    return value is None or (isinstance(value, float) and value != value)


def _describe(value: Any) -> str:
    """How a non-text value reads in an error: "the number 42", "the boolean true"."""
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, int | float):
        return f"the number {json.dumps(value)}"
    shown = repr(value)
    return f"a {type(value).__name__} ({shown[:40]}{'...' if len(shown) > 40 else ''})"


def _fill_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row every column (None where it has none), so the first row shows all of the file's columns."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key) for key in columns} for row in rows]


def detect_format(rows: list[dict[str, Any]], source: str, fmt: str | None = None) -> str:
    """The data format: ``fmt`` if given (checked against the columns), else guessed from them.

    Raises:
        ValueError: names the file, the columns found and the fields each format expects.
    """
    columns = set(rows[0])
    expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in REQUIRED.items())
    if fmt is None:
        for name, cols in REQUIRED.items():
            if set(cols) <= columns:
                return name
        raise ValueError(f"{source}: cannot tell the format from columns {sorted(columns)}; expected fields "
                         f"({expected}).")
    if fmt not in REQUIRED:
        raise ValueError(f"Unknown format {fmt!r}; expected one of {', '.join(REQUIRED)}.")
    missing = [c for c in REQUIRED[fmt] if c not in columns]
    if missing:
        raise ValueError(f"{source}: format {fmt!r} needs column(s) {missing}; the file has {sorted(columns)}.")
    return fmt


def to_examples(rows: list[dict[str, Any]], fmt: str, tokenizer: Any, source: str) -> list[Example]:
    """Render each row as prompt + response text, checking its fields.

    Raises:
        ValueError: a row lacks a field or has the wrong type; names ``source`` and the row number.
    """
    render = {"alpaca": _alpaca, "chat": _chat, "text": _text}[fmt]
    examples = []
    for number, row in enumerate(rows, start=1):
        try:
            examples.append(render(row, tokenizer))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}, row {number}: {err} (format {fmt!r} expects "
                             f"{', '.join(REQUIRED[fmt])}).") from None
    return examples


def _field(row: dict[str, Any], key: str, required: bool = True) -> str:
    value = row.get(key)
    if _is_missing(value):
        if required:
            raise ValueError(f"field {key!r} is missing or empty")
        return ""
    if not isinstance(value, str):
        raise TypeError(f"field {key!r} must be text, got {type(value).__name__}")
    return value


def _alpaca(row: dict[str, Any], tokenizer: Any) -> Example:
    instruction, output = _field(row, "instruction"), _field(row, "output")
    extra = _field(row, "input", required=False)
    if getattr(tokenizer, "chat_template", None):
        content = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": output}]
        return _chat({"messages": messages}, tokenizer)
    input_block = f"### Input:\n{extra}\n\n" if extra else ""
    prompt = ALPACA_PROMPT.format(instruction=instruction, input_block=input_block)
    return Example(prompt, output + (tokenizer.eos_token or ""), output, question=f"{instruction} {extra}".strip())


def _chat(row: dict[str, Any], tokenizer: Any) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list of {role, content}")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                or not isinstance(turn.get("content"), str):
            raise ValueError("every message needs a text 'role' and a text 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message must have role 'assistant' (the answer to learn), "
                         f"got {messages[-1]['role']!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use format 'alpaca' or 'text' for this model")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation so that the prompt is not a prefix of it")
    question = next((t["content"] for t in reversed(messages[:-1]) if t["role"] == "user"), "")
    return Example(prompt, full[len(prompt):], messages[-1]["content"], special_in_prompt=True, question=question)


def _text(row: dict[str, Any], tokenizer: Any) -> Example:
    text = _field(row, "text")
    return Example("", text + (tokenizer.eos_token or ""), "")


def tokenize(examples: list[Example], tokenizer: Any, max_length: int, source: str) -> Tokenized:
    """Token ids, attention mask and labels (prompt positions = -100), cut to ``max_length``.

    Prompt and response are tokenized apart and joined, so the prompt tokens are exactly those
    that generation sees.

    Raises:
        ValueError: a prompt leaves no room for a response token within max_length; names the row.
    """
    rows, truncated = [], 0
    for number, example in enumerate(examples, start=1):
        prompt_ids = prompt_token_ids(example, tokenizer)
        response_ids = tokenizer(example.response, add_special_tokens=not example.prompt)["input_ids"]
        if len(prompt_ids) >= max_length:
            raise ValueError(f"{source}, row {number}: the prompt alone is {len(prompt_ids)} tokens, so "
                             f"max_length={max_length} leaves no room for the response; raise --max-length.")
        ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Tokenized(rows, truncated)


def prompt_token_ids(example: Example, tokenizer: Any) -> list[int]:
    """The prompt's ids as training and generation both see them."""
    if not example.prompt:
        return []
    return tokenizer(example.prompt, add_special_tokens=not example.special_in_prompt)["input_ids"]


def split_rows(rows: list[Any], eval_size: int, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``eval_size`` rows (at most a fifth of the data), chosen by ``seed``.

    Returns:
        (train rows, held-out rows); the held-out list is empty when eval_size is 0.
    """
    if eval_size <= 0 or len(rows) < 2:
        return rows, []
    held = min(eval_size, max(1, len(rows) // 5))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held])
    return [r for i, r in enumerate(rows) if i not in chosen], [rows[i] for i in sorted(chosen)]
