"""Scores on held-out data: exact match of greedy answers, and the mean loss on response tokens.

Generation is batched with left padding (so every row's prompt ends where generation starts) and
greedy, which makes the score deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import IGNORE_INDEX, Example, prompt_token_ids


@dataclass
class EvalResult:
    """exact_match: share of rows whose answer equals the reference (None when nothing to compare)."""

    exact_match: float | None
    loss: float | None
    count: int
    predictions: list[str]


def default_max_new_tokens(examples: list[Example], tokenizer: Any, margin: int = 8) -> int:
    """Just enough new tokens for the longest reference answer, plus a margin for the end token."""
    longest = max((len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples), default=0)
    return longest + margin


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: Any, examples: list[Example], max_new_tokens: int, batch_size: int = 100
) -> list[str]:
    """Greedy answers to each example's prompt, decoded without special tokens and stripped."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [prompt_token_ids(e, tokenizer) for e in examples[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    model.train(was_training)
    return answers


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after stripping surrounding whitespace."""
    if not references:
        raise ValueError("exact_match needs at least one reference.")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)


@torch.no_grad()
def mean_loss(model: nn.Module, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean cross-entropy on the labelled (response) tokens of ``rows``."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
        total += losses.item()
        tokens += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(tokens, 1)


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ids with ``pad_id``, mask with 0, labels with -100."""
    width = max(len(r["input_ids"]) for r in rows)
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.tensor([r[key] + [pad] * (width - len(r[key])) for r in rows]) for key, pad in pads.items()}


def evaluate(
    model: nn.Module, tokenizer: Any, examples: list[Example], rows: list[dict[str, list[int]]] | None = None,
    max_new_tokens: int | None = None, batch_size: int = 100, bf16: bool = False,
) -> EvalResult:
    """Exact match on examples that have a reference answer, and the loss on ``rows`` when given.

    With ``bf16`` the model runs under bf16 autocast, as it trained (about 2-3x faster on CPUs with AMX).
    """
    device = next(model.parameters()).device.type
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        return _evaluate(model, tokenizer, examples, rows, max_new_tokens, batch_size)


def _evaluate(model: nn.Module, tokenizer: Any, examples: list[Example], rows: list[dict[str, list[int]]] | None,
              max_new_tokens: int | None, batch_size: int) -> EvalResult:
    with_reference = [e for e in examples if e.reference]
    predictions: list[str] = []
    score = None
    if with_reference:
        max_new_tokens = max_new_tokens or default_max_new_tokens(with_reference, tokenizer)
        predictions = generate_answers(model, tokenizer, with_reference, max_new_tokens, batch_size)
        score = exact_match(predictions, [e.reference for e in with_reference])
    loss = mean_loss(model, rows, tokenizer.pad_token_id) if rows else None
    return EvalResult(score, loss, len(examples), predictions)
