"""Tokenisation of formatted rows into training examples, and the batch collators."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

IGNORE_INDEX = -100


@dataclass
class TaskData:
    train: Dataset
    eval: Dataset
    collator: object
    # For generation-based metrics: the eval prompts and their reference responses.
    eval_prompts: list[str]
    eval_references: list[str]


def tokenize_sft(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Prompt + response + EOS; the loss is on the response tokens only."""
    examples = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        input_ids = (prompt + response)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # the prompt alone fills max_length: nothing to learn from this row
        examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return Dataset.from_list(examples)


def tokenize_lm(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Plain language modelling: concatenate the texts and cut them into blocks of max_length."""
    stream: list[int] = []
    for row in rows:
        stream += tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [stream[i : i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
    if not blocks:  # less text than one block: train on what there is
        blocks = [stream]
    return Dataset.from_list(
        [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks]
    )


def tokenize_cls(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    examples = []
    for row in rows:
        encoded = tokenizer(row["text"], row["text_pair"], truncation=True, max_length=max_length)
        examples.append(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "labels": row["label"],
            }
        )
    return Dataset.from_list(examples)


TOKENIZERS = {"sft": tokenize_sft, "lm": tokenize_lm, "cls": tokenize_cls}


def build_task_data(
    train_rows: list[dict],
    eval_rows: list[dict],
    task_format: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    packing: bool,
    flash_attention: bool = False,
) -> TaskData:
    """Tokenised train/eval sets and the collator.

    With packing (SFT tasks), a batch is one row of concatenated examples with position ids that
    restart at each example: no padding is computed, and the attention kernel keeps examples apart
    (transformers derives the block-diagonal mask from the position ids for sdpa and eager; flash
    attention takes the sequence boundaries directly). LM tasks are cut into blocks of max_length,
    which have no padding to remove: packing them would only widen the attention to the whole row."""
    tokenize = TOKENIZERS[task_format]
    if task_format == "cls":
        collator = DataCollatorWithPadding(tokenizer)
    elif packing and task_format == "sft":
        collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_attention)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    sft = task_format == "sft"
    return TaskData(
        train=tokenize(train_rows, tokenizer, max_length),
        eval=tokenize(eval_rows, tokenizer, max_length),
        collator=collator,
        eval_prompts=[r["prompt"] for r in eval_rows] if sft else [],
        eval_references=[r["response"] for r in eval_rows] if sft else [],
    )


def longest_batch(data: TaskData, batch_size: int) -> dict:
    """The training batch of the longest examples, collated as training collates: the most memory a
    step will need."""
    lengths = [len(ids) for ids in data.train["input_ids"]]
    longest = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)[:batch_size]
    return data.collator([data.train[i] for i in longest])
