"""Tokenisation of formatted rows into training examples, and the batch collators."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from lora_lab.chat import Chat, assistant_tokens, generation_prompts, resolve_template
from lora_lab.config import TaskConfig
from lora_lab.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TaskData:
    train: Dataset
    eval: Dataset
    collator: object
    # For generation-based metrics: the eval prompts and their reference responses.
    eval_prompts: list[str]
    eval_references: list[str]
    # Tokens that end a response besides EOS: a chat template's end-of-turn tokens.
    stop_token_ids: list[int] = field(default_factory=list)


def tokenize_sft(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Prompt + response + EOS; the loss is on the response tokens only.

    The pair is tokenised as one text, as the model will read it, and the response's tokens are
    those that start at or after the prompt's end: tokenising the response on its own gives
    SentencePiece tokenizers a stray word-start token ("▁") that never occurs in the joined text."""

    def examples():
        for row in rows:
            prompt, response = row["prompt"], row["response"]
            encoded = tokenizer(prompt + response, add_special_tokens=True, return_offsets_mapping=True)
            boundary = len(prompt)
            # A token that straddles the boundary (a merge across it) belongs to the prompt.
            learned = [start >= boundary and end > start for start, end in encoded["offset_mapping"]]
            yield encoded["input_ids"] + [tokenizer.eos_token_id], learned + [True]

    return _labelled_examples(examples(), len(rows), max_length, "examples")


def tokenize_chat(
    rows: list[dict], chat: Chat, max_length: int, train_on: str, source: tuple[str, object]
) -> Dataset:
    """One example per conversation, the loss on its assistant turns (lora_lab/chat.py)."""
    encoded = assistant_tokens(rows, chat, train_on, source)
    return _labelled_examples(encoded, len(rows), max_length, "conversations")


def _labelled_examples(
    encoded: Iterable[tuple[list[int], list[bool]]], count: int, max_length: int, what: str
) -> Dataset:
    """Examples from token ids and which of them carry the loss, cut at max_length; those cut are
    counted and logged, and those left with nothing to learn dropped."""
    examples, cut = [], 0
    for input_ids, learned in encoded:
        labels = [token if on else IGNORE_INDEX for token, on in zip(input_ids, learned, strict=True)]
        if len(input_ids) > max_length:
            cut += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # what there is to learn lies past max_length
        examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    if cut:
        log.warning(
            "%d of %d %s are longer than task.max_length=%d and were cut (%d left with no token to "
            "learn, dropped): raise task.max_length to train on whole %s",
            cut,
            count,
            what,
            max_length,
            count - len(examples),
            what,
        )
    if count and not examples:
        raise ConfigError(
            "task.max_length",
            max_length,
            f"each of the {count} {what} is cut before a token it could learn from: raise it",
        )
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


def skips_cross_example_attention(attn_implementation: str) -> bool:
    """Flash attention (varlen) and flex attention (block-sparse masks) do no work between packed
    examples, so a whole batch fits one row at no extra cost. sdpa and eager compute a dense mask
    over each row: their cost grows with the square of the row's length."""
    return "flash" in attn_implementation or attn_implementation == "flex_attention"


class RowPackingCollator:
    """Padding-free batches for dense-mask attention (sdpa, eager): rows no longer than the batch's
    longest example, filled first-fit by decreasing length, so that attention and the linear layers
    do at most the padded batch's work. Each row is flattened as DataCollatorWithFlattening flattens a
    batch: position ids restart at every example, which is how the model keeps examples apart. A
    row shorter than the longest is filled with padding that continues its last example's positions
    and has no labels; causal attention never lets that example see it. A batch of one example per
    row thus has no packed mask at all, and attention takes its plain causal path."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.flatten = DataCollatorWithFlattening(return_tensors="pt")

    def __call__(self, features: list[dict]) -> dict:
        by_length = sorted(features, key=lambda f: len(f["input_ids"]), reverse=True)
        width = len(by_length[0]["input_ids"])
        rows: list[list[dict]] = []
        room: list[int] = []
        for feature in by_length:
            length = len(feature["input_ids"])
            fits = next((i for i, free in enumerate(room) if free >= length), None)
            if fits is None:
                rows.append([feature])
                room.append(width - length)
            else:
                rows[fits].append(feature)
                room[fits] -= length
        batch: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row, free in zip(rows, room, strict=True):
            flat = self.flatten(row)
            last_position = int(flat["position_ids"][0, -1])
            batch["input_ids"].append(F.pad(flat["input_ids"][0], (0, free), value=self.pad_token_id))
            batch["labels"].append(F.pad(flat["labels"][0], (0, free), value=IGNORE_INDEX))
            tail = torch.arange(last_position + 1, last_position + 1 + free)
            batch["position_ids"].append(torch.cat([flat["position_ids"][0], tail]))
        return {key: torch.stack(values) for key, values in batch.items()}


def batch_collator(
    task_format: str, tokenizer: PreTrainedTokenizerBase, packing: bool, attn_implementation: str
):
    """How training batches are collated. Packing applies to SFT examples and conversations (each
    conversation one example, kept apart from the others in its row); LM tasks are cut into blocks of
    max_length, which have no padding to remove; classification is padded."""
    if task_format == "cls":
        return DataCollatorWithPadding(tokenizer)
    if not (packing and task_format in ("sft", "chat")):
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    if skips_cross_example_attention(attn_implementation):
        return DataCollatorWithFlattening(return_flash_attn_kwargs="flash" in attn_implementation)
    return RowPackingCollator(tokenizer.pad_token_id)


def batch_to(batch: dict, device) -> dict:
    """A collated batch on `device`. Flash-attention batches also carry plain ints (max_length_q/k)."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def real_tokens(batch: dict, pad_token_id: int | None) -> torch.Tensor:
    """How many tokens of a collated batch are data, not padding. Padded batches say so in their
    attention mask. Packed batches have none, and the pad id alone cannot tell their padding: it is
    often the EOS token that every example ends with. Their padding is the pad id with no label."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return ((batch["input_ids"] != pad_token_id) | (batch["labels"] != IGNORE_INDEX)).sum()


def build_task_data(
    train_rows: list[dict],
    eval_rows: list[dict],
    task_format: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    packing: bool,
    attn_implementation: str = "sdpa",
    train_on: str = "all_assistant",
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    train_on_reasoning: bool = True,
    row_sources: tuple[tuple[str, object], tuple[str, object]] = (
        ("task.train_path", None),
        ("task.eval_path", None),
    ),
) -> TaskData:
    """Tokenised train/eval sets, the collator (`batch_collator`) and, for SFT and chat, the eval
    prompts and references of generation metrics. Conversations (`chat`) are rendered with
    `chat_template` (task.chat_template, else the tokenizer's own) with `chat_template_kwargs`, and learn the assistant turns that
    `train_on` names; a bad one is refused naming the config key and value its rows come from
    (`row_sources`, train and eval) and its row."""
    collator = batch_collator(task_format, tokenizer, packing, attn_implementation)
    train_source, eval_source = row_sources
    if task_format == "chat":
        chat = Chat(
            tokenizer,
            resolve_template(tokenizer, chat_template),
            chat_template_kwargs or {},
            train_on_reasoning,
        )
        train = tokenize_chat(train_rows, chat, max_length, train_on, train_source)
        evaluation = tokenize_chat(eval_rows, chat, max_length, train_on, eval_source)
        prompts, references = generation_prompts(eval_rows, chat, eval_source)
        return TaskData(train, evaluation, collator, prompts, references, chat.end_of_turn_ids)
    tokenize = TOKENIZERS[task_format]
    sft = task_format == "sft"
    return TaskData(
        train=tokenize(train_rows, tokenizer, max_length),
        eval=tokenize(eval_rows, tokenizer, max_length),
        collator=collator,
        eval_prompts=[r["prompt"] for r in eval_rows] if sft else [],
        eval_references=[r["response"] for r in eval_rows] if sft else [],
    )


def row_sources(task: TaskConfig) -> tuple[tuple[str, object], tuple[str, object]]:
    """The config keys and values that name where the train and eval rows come from, for errors
    about a row: the files (an eval split of the training file is its own), the hub dataset, or the
    built-in task."""
    if task.source == "hub":
        return ("task.dataset", task.dataset), ("task.dataset", task.dataset)
    if task.source == "builtin":
        return ("task.name", task.name), ("task.name", task.name)
    train = ("task.train_path", task.train_path)
    return train, ("task.eval_path", task.eval_path) if task.eval_path else train


def longest_batch(data: TaskData, batch_size: int) -> dict:
    """The training batch of the longest examples, collated as training collates: the most memory a
    step will need."""
    lengths = [len(ids) for ids in data.train["input_ids"]]
    longest = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)[:batch_size]
    return data.collator([data.train[i] for i in longest])
