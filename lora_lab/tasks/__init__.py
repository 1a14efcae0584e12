"""Task sources: built-in generated data, the user's JSONL files, and hub datasets.

Each loader returns rows in one of three shapes, by `task.format`:
`sft` {prompt, response}, `lm` {text}, `cls` {text, text_pair, label (int)}.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_lab.config import ConfigError, TaskConfig
from lora_lab.tasks.builtin import BUILTIN_TASKS
from lora_lab.tasks.hub import TEMPLATES


def load_rows(task: TaskConfig) -> tuple[list[dict], list[dict]]:
    """Train and eval rows, formatted and capped at task.max_train_samples / max_eval_samples."""
    if task.source == "builtin":
        if task.name not in BUILTIN_TASKS:
            raise ConfigError("task.name", task.name, f"built-in tasks are {', '.join(BUILTIN_TASKS)}")
        raw_train, raw_eval = BUILTIN_TASKS[task.name]("train"), BUILTIN_TASKS[task.name]("eval")
    elif task.source == "jsonl":
        raw_train = _read_jsonl("task.train_path", task.train_path)
        raw_eval = _read_jsonl("task.eval_path", task.eval_path)
    else:
        raw_train = _load_hub_split(task, task.train_split)
        raw_eval = _load_hub_split(task, task.eval_split)
    train = [format_row(task, row, i) for i, row in enumerate(raw_train[: task.max_train_samples])]
    evaluation = [format_row(task, row, i) for i, row in enumerate(raw_eval[: task.max_eval_samples])]
    if task.format == "lm":
        train, evaluation = (
            [r for r in train if r["text"].strip()],
            [r for r in evaluation if r["text"].strip()],
        )
    for key, rows in (("task.train_path", train), ("task.eval_path", evaluation)):
        if not rows:
            raise ConfigError(key, getattr(task, key.split(".")[1]), "the data has no usable rows")
    return train, evaluation


def format_row(task: TaskConfig, row: dict, index: int) -> dict:
    if task.template is not None:
        if task.template not in TEMPLATES:
            raise ConfigError("task.template", task.template, f"templates are {', '.join(TEMPLATES)} or null")
        return TEMPLATES[task.template](row)
    fields = {
        "sft": [task.prompt_field, task.response_field],
        "lm": [task.text_field],
        "cls": [task.text_field, task.label_field] + ([task.text_pair_field] if task.text_pair_field else []),
    }[task.format]
    for name in fields:
        if name not in row:
            key = next(
                k
                for k in ("prompt_field", "response_field", "text_field", "label_field", "text_pair_field")
                if getattr(task, k) == name
            )
            raise ConfigError(
                f"task.{key}", name, f"row {index} has no such field (fields: {', '.join(row)})"
            )
    if task.format == "sft":
        return {"prompt": str(row[task.prompt_field]), "response": str(row[task.response_field])}
    if task.format == "lm":
        return {"text": str(row[task.text_field])}
    return {
        "text": str(row[task.text_field]),
        "text_pair": str(row[task.text_pair_field]) if task.text_pair_field else None,
        "label": _label_index(task, row[task.label_field], index),
    }


def _label_index(task: TaskConfig, label: object, index: int) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ConfigError(
            "task.label_field", task.label_field, f"row {index} has label {label!r}; labels are ints or names"
        )
    if isinstance(label, str):
        if label not in task.labels:
            raise ConfigError("task.labels", task.labels, f"row {index} has label {label!r}, not one of them")
        return task.labels.index(label)
    if not 0 <= label < len(task.labels):
        raise ConfigError(
            "task.labels", task.labels, f"row {index} has label {label}, outside 0..{len(task.labels) - 1}"
        )
    return label


def _read_jsonl(key: str, path: str | None) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(key, path, f"line {number} is not valid JSON ({e.msg})") from None
    return rows


def _load_hub_split(task: TaskConfig, split: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(task.dataset, task.dataset_config, split=split).to_list()
    except Exception as e:  # offline, unknown id or split: datasets raises many types
        raise ConfigError(
            "task.dataset",
            task.dataset,
            f"could not load split {split!r} ({type(e).__name__}: {str(e).splitlines()[0]})",
        ) from None
