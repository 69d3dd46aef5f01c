"""The built-in task: deterministic, exact answers, no held-out sentence seen in training."""

from __future__ import annotations

import json

from deltatune.train.task import INSTRUCTION, NUMBER_WORDS, builtin_splits


def test_same_seed_same_rows_other_seed_other_rows():
    assert builtin_splits(50, 20, seed=1) == builtin_splits(50, 20, seed=1)
    assert builtin_splits(50, 20, seed=1)[0] != builtin_splits(50, 20, seed=2)[0]


def test_held_out_never_seen_in_training():
    train, held = builtin_splits(800, 100)
    train_prompts = {r["messages"][0]["content"] for r in train}
    held_prompts = [r["messages"][0]["content"] for r in held]
    assert len(held_prompts) == len(set(held_prompts)) == 100
    assert not train_prompts & set(held_prompts)


def test_answer_is_one_line_json_consistent_with_the_sentence():
    train, _ = builtin_splits(200, 1)
    for row in train:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert question.startswith(INSTRUCTION) and "\n" not in answer
        fields = json.loads(answer)
        assert list(fields) == ["name", "city", "item", "qty"]
        assert fields["name"] in question and fields["city"] in question and fields["item"][:3] in question
        qty = fields["qty"]
        assert 1 <= qty <= 12
        assert str(qty) in question or NUMBER_WORDS[qty] in question or (qty == 1 and " a " in question)
