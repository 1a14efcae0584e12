"""Prompt templates of the hub task presets, applied to rows of the hub datasets' own shape.

GLUE tasks (sst2, mrpc, rte) and wikitext2 need no template: their configs name the fields.
"""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def gsm8k(row: dict) -> dict:
    """GSM8K: the worked solution is the response; its final line is `#### <number>`."""
    return {"prompt": f"Question: {row['question']}\nAnswer:", "response": " " + row["answer"]}


def alpaca(row: dict) -> dict:
    template = ALPACA_WITH_INPUT if row.get("input") else ALPACA_NO_INPUT
    return {"prompt": template.format(**row), "response": row["output"]}


TEMPLATES = {"gsm8k": gsm8k, "alpaca": alpaca}
