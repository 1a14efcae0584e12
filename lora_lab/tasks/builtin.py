"""Built-in offline tasks, generated deterministically from fixed seeds (nothing to download).

`sort` (causal LM, SFT): sort a short list of digits; the tiny model learns it in a few hundred steps.
`chat_sort` (causal LM, chat): conversations of a system message and several turns of the sort task,
rendered with the model's chat template; the loss is on the assistant turns.
`sentiment` (classification): short reviews whose label follows from the adjective.
"""

from __future__ import annotations

import random

TRAIN_SIZE, EVAL_SIZE = 2000, 256
_SEEDS = {"train": 1234, "eval": 5678}

POSITIVE = ["good", "great", "superb", "lovely", "excellent", "wonderful", "pleasant", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "dull", "terrible", "boring", "horrible", "weak"]
SUBJECTS = [
    "the film",
    "the food",
    "the service",
    "the show",
    "this book",
    "the hotel",
    "the game",
    "our trip",
]
TEMPLATES = ["{s} was {a}", "honestly, {s} felt {a}", "{s} is {a} overall", "i think {s} was {a} today"]


def sort_rows(split: str) -> list[dict]:
    rng = random.Random(_SEEDS[split])
    rows = []
    for _ in range(TRAIN_SIZE if split == "train" else EVAL_SIZE):
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 5))]
        rows.append({"prompt": f"sort {' '.join(digits)} :", "response": " " + " ".join(sorted(digits))})
    return rows


CHAT_SORT_SYSTEM = "Sort the digits."


def chat_sort_rows(split: str) -> list[dict]:
    rng = random.Random(_SEEDS[split])
    rows = []
    for _ in range(TRAIN_SIZE if split == "train" else EVAL_SIZE):
        messages = [{"role": "system", "content": CHAT_SORT_SYSTEM}]
        for _ in range(rng.randint(2, 3)):
            digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 5))]
            messages += [
                {"role": "user", "content": f"sort {' '.join(digits)}"},
                {"role": "assistant", "content": " ".join(sorted(digits))},
            ]
        rows.append({"messages": messages})
    return rows


def sentiment_rows(split: str) -> list[dict]:
    rng = random.Random(_SEEDS[split])
    rows = []
    for _ in range(TRAIN_SIZE if split == "train" else EVAL_SIZE):
        label = rng.randrange(2)
        adjective = rng.choice(POSITIVE if label else NEGATIVE)
        text = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), a=adjective)
        rows.append({"text": text, "label": label})
    return rows


BUILTIN_TASKS = {"sort": sort_rows, "chat_sort": chat_sort_rows, "sentiment": sentiment_rows}
