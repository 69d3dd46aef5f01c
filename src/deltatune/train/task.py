"""The built-in task: turn a shop order written in plain English into one line of JSON.

Example::

    user:      Order to JSON: Hi, this is Maria Lopez from Lyon. Could you send me three mugs?
    assistant: {"name": "Maria Lopez", "city": "Lyon", "item": "mug", "qty": 3}

Why this task: it has one exact answer (so exact match is a fair score), it needs no download
(examples are generated from word lists with a seeded RNG), and a pretrained chat model cannot
do it out of the box: it does not know the schema (key names and order, singular item names,
quantities written as words turned into integers, one line), so it scores near zero before
training, while a LoRA adapter learns it from a few hundred examples. Train and held-out
examples never share a sentence (and some held-out people have first names training never uses).
"""

from __future__ import annotations

import json
import random

INSTRUCTION = "Order to JSON:"
BUILTIN_STEPS = 40  # the default run: 40 steps x batch 8 = 320 examples, each seen once

FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Pedro", "Chloe", "Ivan", "Fatima", "Noah", "Sofia", "Kenji",
         "Amara", "Lucas", "Elena", "Ravi", "Zoe", "Mateo", "Hana", "Felix", "Nadia", "Oscar", "Ingrid", "Tariq",
         "Clara", "Diego", "Yara", "Hugo", "Mei", "Samuel", "Alice", "Bruno", "Leila", "Victor", "Greta", "Kofi"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Martin", "Petrov", "Khan", "Brown", "Rossi",
        "Sato", "Okafor", "Moreau", "Novak", "Patel", "Clark", "Garcia", "Kim", "Weber", "Ali", "Berg", "Larsen",
        "Costa", "Dubois", "Mendes", "Nguyen", "Meyer", "Jensen", "Walker", "Romano", "Ito", "Lindqvist", "Owusu"]
CITIES = ["Lyon", "Boston", "Osaka", "Cairo", "Munich", "Porto", "Dublin", "Kyiv", "Lahore", "Denver", "Milan",
          "Nagoya", "Lagos", "Nantes", "Prague", "Pune", "Leeds", "Seville", "Busan", "Bremen", "Tunis", "Bergen",
          "Aarhus", "Recife", "Lille", "Quito", "Hanoi", "Cologne", "Oslo", "Austin", "Turin", "Kobe", "Malmo"]
# (singular, plural) - the answer always uses the singular.
ITEMS = [("mug", "mugs"), ("notebook", "notebooks"), ("lamp", "lamps"), ("candle", "candles"),
         ("backpack", "backpacks"), ("pillow", "pillows"), ("teapot", "teapots"), ("scarf", "scarves"),
         ("umbrella", "umbrellas"), ("blanket", "blankets"), ("kettle", "kettles"), ("pencil", "pencils"),
         ("towel", "towels"), ("wallet", "wallets"), ("clock", "clocks"), ("plate", "plates"),
         ("knife", "knives"), ("glass", "glasses"), ("brush", "brushes"), ("box", "boxes")]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
TEMPLATES = [
    "Hi, this is {name} from {city}. Could you send me {qty} {items}?",
    "Please ship {qty} {items} to {name} in {city}.",
    "{name} ({city}) would like to order {qty} {items}.",
    "I need {qty} {items} delivered to {city}, thanks! - {name}",
    "New order from {name}, {city}: {qty} {items}.",
    "Can {name} in {city} get {qty} {items} by Friday?",
    "Send {qty} {items} please. Name: {name}. City: {city}.",
    "Hello! {name} here, writing from {city}. I'd like {qty} {items}.",
]


def _one_example(rng: random.Random, first_names: list[str]) -> tuple[str, str]:
    name = f"{rng.choice(first_names)} {rng.choice(LAST)}"
    city = rng.choice(CITIES)
    singular, plural = rng.choice(ITEMS)
    qty = rng.randint(1, 12)
    qty_text = (NUMBER_WORDS[qty] if rng.random() < 0.5 else str(qty)) if qty > 1 else rng.choice(["one", "1", "a"])
    items = singular if qty == 1 else plural
    sentence = rng.choice(TEMPLATES).format(name=name, city=city, qty=qty_text, items=items)
    answer = json.dumps({"name": name, "city": city, "item": singular, "qty": qty})
    return f"{INSTRUCTION} {sentence}", answer


def _row(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def builtin_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of the order task, as chat rows ``{"messages": [user, assistant]}``.

    Training draws first names from the first 30 of ``FIRST``; the held-out split from all of
    them (so some people are new), and no held-out sentence appears in training.

    Raises:
        ValueError: a count is not positive.
    """
    if n_train <= 0 or n_eval <= 0:
        raise ValueError(f"n_train and n_eval must be positive, got {n_train} and {n_eval}.")
    seen: set[str] = set()
    splits: list[list[dict]] = []
    for split, n, first_names in (("train", n_train, FIRST[:30]), ("eval", n_eval, FIRST)):
        rng = random.Random(f"{seed}-{split}")
        rows: list[dict] = []
        while len(rows) < n:
            prompt, answer = _one_example(rng, first_names)
            if prompt not in seen:
                seen.add(prompt)
                rows.append(_row(prompt, answer))
        splits.append(rows)
    return splits[0], splits[1]
