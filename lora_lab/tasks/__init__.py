"""Task sources: built-in generated data, the user's files, and hub datasets.

Rows of every source come in one of the row shapes of `config.ROW_SHAPE_FORMATS`, detected from the
first training row's fields (or forced by `task.shape`), and are normalised to what their format's
tokeniser takes (lora_lab/data.py): `sft` {prompt, response}, `lm` {text}, `cls` {text, text_pair,
label (int)}, `chat` {messages: [{role: system|user|assistant|tool, content, ...}, ...], tools}.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lora_lab.config import ROW_SHAPE_FORMATS, TaskConfig
from lora_lab.errors import ConfigError
from lora_lab.tasks.builtin import BUILTIN_TASKS
from lora_lab.tasks.files import digest, read_rows
from lora_lab.tasks.hub import TEMPLATES, alpaca

log = logging.getLogger("lora_lab")

# In a run dir: the row shape read, the labels, the eval split (reloads read the data as it trained).
DATA_RECORD = "data.json"
# The eval split of a file without task.eval_path: fixed, so that repeats over train.seed and every
# reload of the run evaluate on the same rows.
SPLIT_SEED = 0
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    # function-calling data (LLaMA-Factory's ShareGPT): the assistant's call and the tool's result
    "function_call": "function_call",
    "observation": "tool",
}


@dataclass(frozen=True)
class Shape:
    """A row shape: the fields it needs, each with the config key that names it, and its normaliser."""

    fields: Callable[[TaskConfig], list[tuple[str, str]]]
    normalise: Callable[[TaskConfig, dict, int], dict]


def _turns(task: TaskConfig, row: dict, index: int, field: str, role_key: str, text_key: str) -> dict:
    """A conversation as lora_lab/chat.py takes it: messages (ShareGPT's turns mapped to them) and the
    row's tools. The messages' contents stay as stored (text, parts, tool calls): chat checks them."""
    turns = row[field]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ConfigError("task.shape", field, f"row {index}: {field} is a list of turns, got {turns!r:.80}")
    tools = {"tools": row["tools"]} if row.get("tools") is not None else {}
    if field == "messages":
        return {"messages": turns, **tools}
    messages = []
    for number, turn in enumerate(turns):
        role = turn.get(role_key)
        if role not in SHAREGPT_ROLES or turn.get(text_key) is None:
            raise ConfigError(
                "task.shape",
                field,
                f"row {index} turn {number} is from {role!r}; ShareGPT turns are from "
                f"{', '.join(SHAREGPT_ROLES)}, each with a {text_key}",
            )
        messages.append(_sharegpt_message(SHAREGPT_ROLES[role], turn[text_key]))
    return {"messages": messages, **tools}


def _sharegpt_message(role: str, value: object) -> dict:
    """A ShareGPT turn as a message: a function_call's value (JSON, {"name", "arguments"}) becomes the
    assistant's tool call, an observation the tool's result."""
    if role == "function_call":
        call = json.loads(value) if isinstance(value, str) else value
        calls = call if isinstance(call, list) else [call]
        return {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": c} for c in calls],
        }
    return {"role": role, "content": value}


def _text_label(task: TaskConfig, row: dict, index: int) -> dict:
    return {
        "text": str(row[task.text_field]),
        "text_pair": str(row[task.text_pair_field]) if task.text_pair_field else None,
        "label": row[task.label_field],  # a name or an index: `_label_index` makes it an index
    }


SHAPES = {
    "messages": Shape(
        lambda t: [("task.shape", "messages")],
        lambda t, row, i: _turns(t, row, i, "messages", "role", "content"),
    ),
    "conversations": Shape(
        lambda t: [("task.shape", "conversations")],
        lambda t, row, i: _turns(t, row, i, "conversations", "from", "value"),
    ),
    "alpaca": Shape(
        lambda t: [("task.shape", "instruction"), ("task.shape", "output")], lambda t, row, i: alpaca(row)
    ),
    "prompt_completion": Shape(
        lambda t: [("task.shape", "prompt"), ("task.shape", "completion")],
        lambda t, row, i: {"prompt": str(row["prompt"]), "response": str(row["completion"])},
    ),
    "prompt_response": Shape(
        lambda t: [("task.prompt_field", t.prompt_field), ("task.response_field", t.response_field)],
        lambda t, row, i: {"prompt": str(row[t.prompt_field]), "response": str(row[t.response_field])},
    ),
    "text_label": Shape(
        lambda t: (
            [("task.text_field", t.text_field), ("task.label_field", t.label_field)]
            + ([("task.text_pair_field", t.text_pair_field)] if t.text_pair_field else [])
        ),
        _text_label,
    ),
    "text": Shape(
        lambda t: [("task.text_field", t.text_field)], lambda t, row, i: {"text": str(row[t.text_field])}
    ),
}
assert list(SHAPES) == list(ROW_SHAPE_FORMATS)  # one table of shapes, in detection order


def text_columns(task: TaskConfig) -> set[str]:
    """The fields the shapes read as text: CSV cells of them must not become numbers."""
    named = {
        field
        for shape in SHAPES.values()
        for key, field in shape.fields(task)
        if key not in ("task.shape", "task.label_field")
    }
    return named | {"prompt", "completion", "instruction", "input", "output"}


def detect_shape(task: TaskConfig, row: dict, where: str) -> str:
    """The row shape of `row`: task.shape, or the first shape (of task.format, unless auto) whose
    fields the row has."""
    if task.shape is not None:
        return task.shape
    present = _present(row)
    candidates = [
        s
        for s in SHAPES
        if task.format in ("auto", ROW_SHAPE_FORMATS[s])
        and (task.kind != "seq_cls" or ROW_SHAPE_FORMATS[s] == "cls")
    ]
    for name in candidates:
        fields = [field for _, field in SHAPES[name].fields(task)]
        if all(field in present for field in fields):
            if ROW_SHAPE_FORMATS[name] == "cls" and task.kind != "seq_cls":
                raise ConfigError(
                    "task.kind",
                    task.kind,
                    f"{where} rows are {name} rows ({', '.join(fields)}): classification needs task.kind=seq_cls "
                    "(or task.shape=text to train a language model on the text)",
                )
            return name
    for name in candidates:  # a shape whose fields the config names, some of them present: say which is not
        named = [(key, field) for key, field in SHAPES[name].fields(task) if key != "task.shape"]
        missing = [(key, field) for key, field in named if field not in present]
        if len(missing) < len(named):
            raise ConfigError(*missing[0], f"{where} row 0 has no such field (fields: {', '.join(present)})")
    needs = "; ".join(
        f"{name}: {', '.join(field for _, field in SHAPES[name].fields(task))}" for name in candidates
    )
    raise ConfigError(
        "task.shape",
        task.shape,
        f"{where} row 0 has fields {', '.join(present)}, which fit no row shape ({needs}); "
        "task.prompt_field, task.response_field, task.text_field and task.label_field name yours",
    )


def _present(row: dict) -> list[str]:
    """The fields a row has a value for: files read through `datasets` share one schema, in which
    a row without a field has it as None."""
    return [name for name, value in row.items() if value is not None]


def format_row(task: TaskConfig, row: dict, index: int, shape: str | None = None) -> dict:
    """One row in its format's shape, a label as its index in task.labels; `shape` None: detected
    from this row."""
    formatted = _normalised(task, row, index, shape)
    if "label" in formatted:
        formatted["label"] = _label_index(task.labels, formatted["label"], index, False, task.label_field)
    return formatted


def _normalised(task: TaskConfig, row: dict, index: int, shape: str | None) -> dict:
    if task.template is not None:
        if task.template not in TEMPLATES:
            raise ConfigError("task.template", task.template, f"templates are {', '.join(TEMPLATES)} or null")
        return TEMPLATES[task.template](row)
    shape = shape or detect_shape(task, row, "the")
    for key, field in SHAPES[shape].fields(task):
        if row.get(field) is None:
            fields = ", ".join(_present(row))
            if key == "task.shape":
                raise ConfigError(key, shape, f"row {index} has no field {field!r} (fields: {fields})")
            raise ConfigError(key, field, f"row {index} has no such field (fields: {fields})")
    return SHAPES[shape].normalise(task, row, index)


class TaskRows(NamedTuple):
    train: list[dict]
    eval: list[dict]
    record: dict  # DATA_RECORD: what a reload needs to read the data as the run did


def load_task(task: TaskConfig, recorded: dict | None = None) -> TaskRows:
    """Train and eval rows, formatted and capped at task.max_train_samples / max_eval_samples.

    Fills in, in place, what the data decides: task.format (auto: the detected shape's) and, for a
    classifier without task.labels, task.labels (the training rows' labels, sorted). `recorded`: the
    run dir's DATA_RECORD of a run being reloaded, whose eval split and labels are reused."""
    split = None
    if task.source == "builtin":
        if task.name not in BUILTIN_TASKS:
            raise ConfigError("task.name", task.name, f"built-in tasks are {', '.join(BUILTIN_TASKS)}")
        raw_train, raw_eval = BUILTIN_TASKS[task.name]("train"), BUILTIN_TASKS[task.name]("eval")
    elif task.source == "files":
        raw_train = read_rows("task.train_path", task.train_path, text_columns(task))
        raw_eval = read_rows("task.eval_path", task.eval_path, text_columns(task)) if task.eval_path else []
    else:
        raw_train = _load_hub_split(task, task.train_split)
        raw_eval = _load_hub_split(task, task.eval_split)
    if not raw_train:
        raise ConfigError("task.train_path", task.train_path, "the data has no rows")
    # (row number in its file, row): errors name the row where the user can find it
    train_pairs, eval_pairs = list(enumerate(raw_train)), list(enumerate(raw_eval))
    eval_key = "task.eval_path"
    if task.source == "files" and not task.eval_path:
        split = _eval_split(task, len(raw_train), recorded)
        chosen = set(split["eval_rows"])
        eval_pairs = [train_pairs[i] for i in split["eval_rows"]]
        train_pairs = [pair for pair in train_pairs if pair[0] not in chosen]
        eval_key = "task.train_path"
    train_pairs, eval_pairs = train_pairs[: task.max_train_samples], eval_pairs[: task.max_eval_samples]
    shape = None if task.template else detect_shape(task, raw_train[0], "the training data's")
    if task.format == "auto":
        task.format = ROW_SHAPE_FORMATS[shape] if shape else "sft"  # templates make prompt/response rows
    train = [_normalised(task, row, number, shape) for number, row in train_pairs]
    evaluation = [_normalised(task, row, number, shape) for number, row in eval_pairs]
    by_name = _settle_labels(task, train, train_pairs, recorded)
    for key, rows, pairs in (("task.train_path", train, train_pairs), (eval_key, evaluation, eval_pairs)):
        for row, (number, _) in zip(rows, pairs, strict=True):
            if "label" in row:
                row["label"] = _label_index(
                    task.labels, row["label"], number, by_name, task.label_field, key, getattr(task, key[5:])
                )
    read = [len(train), len(evaluation)]
    if task.format == "lm":
        train, evaluation = (
            [r for r in train if r["text"].strip()],
            [r for r in evaluation if r["text"].strip()],
        )
    for key, rows, count in (("task.train_path", train, read[0]), (eval_key, evaluation, read[1])):
        if not rows:
            why = f": each {task.text_field!r} is empty" if count and task.format == "lm" else ""
            raise ConfigError(key, getattr(task, key[5:]), f"none of its {count} rows is usable{why}")
    fields = [f for _, f in SHAPES[shape].fields(task)] if shape else []
    log.info(
        "task %s: %s rows (fields %s), read as %s%s; %d train / %d eval rows%s",
        task.name,
        shape or f"template {task.template}",
        ", ".join(fields) or "of the template",
        task.format,
        f", labels {', '.join(task.labels)}" + (" (from the training rows)" if by_name else "")
        if task.format == "cls"
        else "",
        len(train),
        len(evaluation),
        f", eval: {task.eval_fraction:g} of {task.train_path} (seed {SPLIT_SEED})" if split else "",
    )
    record = {
        "shape": shape,
        "fields": fields,
        "format": task.format,
        "labels": list(task.labels),
        "labels_inferred": by_name,
        "eval_split": split,
    }
    return TaskRows(train, evaluation, record)


def load_rows(task: TaskConfig, recorded: dict | None = None) -> tuple[list[dict], list[dict]]:
    """`load_task`'s train and eval rows."""
    rows = load_task(task, recorded)
    return rows.train, rows.eval


def read_record(run_dir: Path) -> dict | None:
    """A run dir's DATA_RECORD; None for a run that has none (made before lora_lab wrote it)."""
    path = run_dir / DATA_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def _eval_split(task: TaskConfig, rows: int, recorded: dict | None) -> dict:
    """The eval rows split off the training file: task.eval_fraction of them, chosen with SPLIT_SEED;
    a recorded split is reused, if the file is still the one it was made from."""
    sha256 = digest("task.train_path", task.train_path)
    if recorded is not None and recorded.get("eval_split"):
        split = recorded["eval_split"]
        if split["sha256"] != sha256:
            raise ConfigError(
                "task.train_path",
                task.train_path,
                "the file changed since the run trained (sha256 differs): its eval split cannot be reproduced",
            )
        return split
    count = max(1, round(rows * task.eval_fraction))
    if count >= rows:
        raise ConfigError(
            "task.eval_fraction",
            task.eval_fraction,
            f"leaves no training rows of the {rows} in {task.train_path}",
        )
    eval_rows = sorted(random.Random(SPLIT_SEED).sample(range(rows), count))
    return {
        "sha256": sha256,
        "rows": rows,
        "eval_fraction": task.eval_fraction,
        "seed": SPLIT_SEED,
        "eval_rows": eval_rows,
    }


def _settle_labels(
    task: TaskConfig, train: list[dict], train_pairs: list[tuple[int, dict]], recorded: dict | None
) -> bool:
    """Fill in task.labels of a classifier that names none: its training rows' labels, sorted (numbers
    as numbers). Returns whether labels are looked up by name only (inferred: a row's label is one of
    them or was never seen in training) rather than as task.labels' names or indices."""
    if task.format != "cls":
        return False
    if recorded is not None:
        task.labels = list(recorded["labels"])
        return recorded["labels_inferred"]
    if task.labels:
        return False
    for row, (number, _) in zip(train, train_pairs, strict=True):
        _check_label(row["label"], number, task.label_field)
    values = {row["label"] for row in train}
    task.labels = [str(v) for v in sorted(values, key=lambda v: (isinstance(v, str), v))]
    if len(task.labels) < 2:
        raise ConfigError(
            "task.labels",
            task.labels,
            f"a classifier needs two labels or more; the training rows have {len(task.labels)}",
        )
    return True


def _check_label(label: object, index: int, field: str, where: str | None = None) -> None:
    """A label is an int or a non-empty name; the error names the field and, apart, the bad value."""
    if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
        origin = f"{where} " if where else ""
        raise ConfigError(
            "task.label_field",
            field,
            f"{origin}row {index} has label {label!r} in it; labels are ints or non-empty names",
        )


def _label_index(
    labels: list[str],
    label: object,
    index: int,
    by_name: bool,
    field: str,
    key: str = "",
    where: str | None = None,
) -> int:
    """`label`'s index in `labels`: by name, or (not by_name) also an int as the index itself."""
    _check_label(label, index, field, where)
    origin = f"{where} " if where else ""
    if by_name:
        if str(label) not in labels:
            raise ConfigError(
                key,
                where,
                f"row {index} has label {label!r}, never seen in training (labels: {', '.join(labels)})",
            )
        return labels.index(str(label))
    if isinstance(label, str):
        if label not in labels:
            raise ConfigError(
                "task.labels", labels, f"{origin}row {index} has label {label!r}, not one of them"
            )
        return labels.index(label)
    if not 0 <= label < len(labels):
        raise ConfigError(
            "task.labels", labels, f"{origin}row {index} has label {label}, outside 0..{len(labels) - 1}"
        )
    return label


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
