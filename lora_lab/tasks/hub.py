"""Prompt templates: GSM8K's for the gsm8k preset (task.template), and Alpaca's, which the alpaca
row shape (instruction, input, output) is read with.

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
    prompt = template.format(instruction=row["instruction"], input=row.get("input"))
    return {"prompt": prompt, "response": str(row["output"])}


TEMPLATES = {"gsm8k": gsm8k}
