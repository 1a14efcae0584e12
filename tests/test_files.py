"""The user's own data files (task=files): every format `datasets` reads, the row shapes detected from
their fields, the eval split recorded with the run, classification with inferred labels, bad input."""

from __future__ import annotations

import csv
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli, compose, read_metrics, train_run
from sklearn.metrics import accuracy_score, f1_score
from test_lifecycle import with_config

from lora_lab.data import TOKENIZERS
from lora_lab.errors import ConfigError
from lora_lab.models import byte_level_tokenizer
from lora_lab.tasks import DATA_RECORD, load_rows, load_task, read_record
from lora_lab.validate import validate

# Text that a CSV reader left to itself would turn into numbers or missing values.
SFT_ROWS = [
    {"prompt": f"copy {w} :", "response": r}
    for w, r in [("a", " 007"), ("b", "12"), ("c", " NA"), ("d", ""), ("e", " x,y"), ("f", "1.50")]
]
CLS_ROWS = [
    {"text": t, "label": lab}
    for t, lab in [("good", "pos"), ("bad", "neg"), ("meh 0", "neg"), ("fine", "pos")]
]


def write(path, rows: list[dict]) -> str:
    """`rows` in the format `path`'s suffix names, written without `datasets` (a save_to_disk dir:
    with it, as only it writes one)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".arrow":
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def files_task(train_path: str, *overrides: str):
    return validate(compose(["task=files", f"task.train_path={train_path}", *overrides])).task


@pytest.mark.parametrize("rows,kind", [(SFT_ROWS, "causal_lm"), (CLS_ROWS, "seq_cls")], ids=["sft", "cls"])
def test_every_file_format_gives_the_same_examples(tmp_path, rows, kind):
    tokenizer = byte_level_tokenizer()
    eval_path = write(tmp_path / "eval.jsonl", rows)
    examples = {}
    for name in ["d.jsonl", "d.json", "d.csv", "d.tsv", "d.parquet", "d.arrow", "saved", "part*.csv"]:
        if name == "part*.csv":  # a glob over two files: their rows in file-name order
            write(tmp_path / "part1.csv", rows[:3])
            write(tmp_path / "part2.csv", rows[3:])
        else:
            write(tmp_path / name, rows)
        task = files_task(str(tmp_path / name), f"task.kind={kind}", f"task.eval_path={eval_path}")
        train, _ = load_rows(task)
        examples[name] = TOKENIZERS[task.format](train, tokenizer, 64).to_list()
    if kind == "seq_cls":
        indexed = [{**r, "text_pair": None, "label": ["neg", "pos"].index(r["label"])} for r in rows]
        expected = TOKENIZERS["cls"](indexed, tokenizer, 64).to_list()
    else:
        expected = TOKENIZERS["sft"](rows, tokenizer, 64).to_list()
    for name, got in examples.items():
        assert got == expected, name


SHAPES = [
    (
        "messages",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ],
            "id": 3,
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        "chat",
    ),
    (
        "conversations",
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        "chat",
    ),
    (
        "alpaca",
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        {
            "prompt": "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n",
            "response": "hello",
        },
        "sft",
    ),
    (
        "prompt_completion",
        {"prompt": "2+2=", "completion": " 4"},
        {"prompt": "2+2=", "response": " 4"},
        "sft",
    ),
    ("prompt_response", {"prompt": "2+2=", "response": " 4"}, {"prompt": "2+2=", "response": " 4"}, "sft"),
    ("text", {"text": "once upon a time", "source": "x"}, {"text": "once upon a time"}, "lm"),
]


@pytest.mark.parametrize("shape,row,expected,task_format", SHAPES, ids=[s[0] for s in SHAPES])
def test_row_shapes_are_detected_and_logged(tmp_path, caplog, shape, row, expected, task_format):
    path = write(tmp_path / "d.jsonl", [row, row])
    task = files_task(path, f"task.eval_path={path}")
    with caplog.at_level(logging.INFO, logger="lora_lab"):
        rows = load_task(task)
    assert rows.train == [expected, expected] and task.format == task_format
    assert rows.record["shape"] == shape
    fields = ", ".join(rows.record["fields"])
    assert f"{shape} rows (fields {fields}), read as {task_format}" in caplog.text


def test_text_label_rows_are_detected_for_a_classifier_and_a_shape_can_be_forced(tmp_path):
    path = write(tmp_path / "d.csv", [{"text": "good", "label": "pos", "prompt": "p"}, *CLS_ROWS])
    task = files_task(path, "task.kind=seq_cls", f"task.eval_path={path}")
    rows = load_task(task)
    assert rows.record["shape"] == "text_label" and rows.record["fields"] == ["text", "label"]
    assert rows.train[0] == {"text": "good", "text_pair": None, "label": 1}
    # an LM on rows that also carry a label and a prompt
    lm = files_task(path, "task.shape=text", f"task.eval_path={path}")
    assert load_task(lm).train[0] == {"text": "good"} and lm.format == "lm"
    with pytest.raises(ConfigError, match="task.kind='causal_lm'.*text_label rows.*task.kind=seq_cls"):
        load_task(files_task(path, f"task.eval_path={path}", "task.shape=null", "task.format=auto"))


def test_labels_are_inferred_sorted_numbers_as_numbers_or_fixed_by_task_labels(tmp_path):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([10, 2, 2, 10, 9])]
    path = write(tmp_path / "d.jsonl", rows)
    task = files_task(path, "task.kind=seq_cls", f"task.eval_path={path}")
    train, _ = load_rows(task)
    assert task.labels == ["2", "9", "10"] and [r["label"] for r in train] == [2, 0, 0, 2, 1]
    named = [{"text": "x", "label": lab} for lab in ["b", "a", "c"]]
    path = write(tmp_path / "named.jsonl", named)
    task = files_task(path, "task.kind=seq_cls", f"task.eval_path={path}", "task.labels=[c,b,a]")
    train, _ = load_rows(task)
    assert task.labels == ["c", "b", "a"] and [r["label"] for r in train] == [1, 2, 0]


def test_an_eval_label_never_seen_in_training_is_refused(tmp_path):
    train = write(tmp_path / "train.csv", CLS_ROWS)
    dev = write(tmp_path / "dev.csv", [*CLS_ROWS, {"text": "so so", "label": "mixed"}])
    with pytest.raises(ConfigError, match=r"task.eval_path=.*dev.csv.*row 4 has label 'mixed', never seen"):
        load_rows(files_task(train, "task.kind=seq_cls", f"task.eval_path={dev}"))


def test_the_eval_split_is_recorded_and_every_reload_reads_it(tmp_path):
    from lora_lab.export import eval_batch
    from lora_lab.runs import load_run

    rows = [{"prompt": f"double {i} :", "response": f" {2 * i}"} for i in range(40)]
    path = write(tmp_path / "all.parquet", rows)
    common = ["task=files", f"task.train_path={path}", "train.max_steps=2", "train.eval_steps=2"]
    common += ["train.eval_on_start=false", "task.metrics=[token_accuracy]"]
    train_run(common, tmp_path / "run")
    with_config(tmp_path / "run", common)
    split = json.loads((tmp_path / "run" / DATA_RECORD).read_text())["eval_split"]
    assert len(split["eval_rows"]) == 4 and split["eval_fraction"] == 0.1
    assert split["eval_rows"] != [0, 1, 2, 3] and split["eval_rows"] != [36, 37, 38, 39]  # shuffled
    held_out = [rows[i] for i in split["eval_rows"]]

    model, tokenizer, run = load_run(tmp_path / "run", "cpu")
    train, evaluation = load_rows(run.task, read_record(tmp_path / "run"))
    assert evaluation == held_out and len(train) == 36 and not any(r in held_out for r in train)
    texts = tokenizer.batch_decode(eval_batch(run, tokenizer, read_record(tmp_path / "run"))["input_ids"])
    assert [t.replace("<pad>", "").removeprefix("<s>") for t in texts] == [
        r["prompt"] + r["response"] for r in held_out
    ]
    # a run that continues from the adapter splits the file the same way
    train_run([*common, f"adapter.init_from={tmp_path / 'run' / 'adapter'}"], tmp_path / "continued")
    assert read_record(tmp_path / "continued")["eval_split"] == split
    # the file changed since: the recorded split no longer holds
    write(tmp_path / "all.parquet", rows[:-1])
    with pytest.raises(ConfigError, match="task.train_path=.*changed since the run trained"):
        load_rows(run.task, read_record(tmp_path / "run"))


def test_classification_from_a_csv_with_nothing_else(tmp_path):
    """task=files task.kind=seq_cls task.train_path=reviews.csv: string labels, no task.labels."""
    words = {"pos": ["great", "superb", "lovely"], "neg": ["awful", "dull", "poor"], "mid": ["okay", "fine"]}
    rows = [
        {"review": f"the {subject} was {word}", "stars": label}
        for subject in ["film", "food", "show", "trip", "hotel", "game"]
        for label, chosen in words.items()
        for word in chosen
    ]
    path = write(tmp_path / "reviews.csv", rows)
    overrides = [
        "task=files",
        "task.kind=seq_cls",
        f"task.train_path={path}",
        "task.text_field=review",
        "task.label_field=stars",
        "train.max_steps=30",
        "train.eval_steps=30",
    ]
    metrics = train_run(overrides, tmp_path / "run")
    with_config(tmp_path / "run", overrides)
    assert metrics["eval/loss"] < metrics["baseline/loss"]
    assert read_record(tmp_path / "run")["labels"] == ["mid", "neg", "pos"]

    from transformers import AutoModelForSequenceClassification

    from lora_lab.export import export
    from lora_lab.generate import classify
    from lora_lab.runs import load_run

    model, tokenizer, run = load_run(tmp_path / "run", "cpu")
    assert run.task.labels == ["mid", "neg", "pos"] and model.config.id2label[2] == "pos"
    _, evaluation = load_rows(run.task, read_record(tmp_path / "run"))
    texts = [r["text"] for r in evaluation]
    # the default metrics, accuracy and macro F1, as scikit-learn computes them
    predicted = [
        run.task.labels.index(label) for label, _ in classify(model, tokenizer, texts, run.task.labels)
    ]
    references = [r["label"] for r in evaluation]
    assert metrics["eval/accuracy"] == pytest.approx(accuracy_score(references, predicted))
    assert metrics["eval/f1_macro"] == pytest.approx(f1_score(references, predicted, average="macro"))

    export(tmp_path / "run", tmp_path / "merged", "cpu", None)  # python -m lora_lab.export, in-process
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        logits = merged(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    exported = [merged.config.id2label[i] for i in logits.argmax(dim=-1).tolist()]
    assert exported == [run.task.labels[i] for i in predicted]
    assert read_metrics(tmp_path / "run")["eval/accuracy"] == pytest.approx(metrics["eval/accuracy"])


def _unreadable(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    return str(path)


BAD_FILES = [
    # (how to make the train file, overrides, the message)
    (
        lambda p: write(p / "reviews.csv", [{"review": "good", "stars": "pos"}] * 3),
        ["task.kind=seq_cls", "task.text_field=review"],
        r"task.label_field='label' is invalid: the training data's row 0 has no such field \(fields: review, stars\)",
    ),
    (_unreadable, [], r"task.train_path=.*broken.parquet.* could not be read"),
    (
        lambda p: write(p / "d.jsonl", SFT_ROWS),
        ["task.shape=xml"],
        r"task.shape='xml' is invalid: valid values are messages, conversations",
    ),
    (lambda p: write(p / "d.jsonl", SFT_ROWS), ["task.format=xml"], r"task.format='xml' is invalid"),
    (lambda p: str(p / "none*.jsonl"), [], r"task.train_path=.*none\*.jsonl.* matches no file"),
    (lambda p: str(p), [], "task.train_path=.* a directory must be one written by datasets' save_to_disk"),
    (lambda p: write(p / "d.jsonl", SFT_ROWS).replace("jsonl", "txt"), [], r"no such file"),
    (
        lambda p: write(p / "d.jsonl", [*SFT_ROWS, {"prompt": "x"}]),
        [],
        r"task.response_field='response' is invalid: row 6 has no such field \(fields: prompt\)",
    ),
    (
        lambda p: write(p / "d.jsonl", [{"conversations": [{"from": "bot", "value": "hi"}]}] * 2),
        [],
        r"row 0 turn 0 is from 'bot'; ShareGPT turns are from system, human",
    ),
    (
        lambda p: write(p / "d.jsonl", [{"text": "x", "label": ""}, {"text": "y", "label": "a"}]),
        ["task.kind=seq_cls"],
        r"row 0 has label ''",
    ),
    (
        lambda p: write(p / "d.jsonl", SFT_ROWS),
        ["task.eval_fraction=1.5"],
        r"task.eval_fraction=1.5 is invalid",
    ),
    # data errors name the file and the line (1-based, as an editor shows it), a bad label the field
    (lambda p: _text(p / "empty.jsonl", ""), [], r"is invalid: .*empty.jsonl, line 1: the file is empty$"),
    (
        lambda p: _text(p / "d.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": \n'),
        [],
        r"is invalid: .*d.jsonl, line 4: not valid JSON \(Expecting value, column 10\)$",
    ),
    (
        lambda p: _text(p / "d.jsonl", '{"text": "a"}\n[1, 2]\n'),
        [],
        r"is invalid: .*d.jsonl, line 2: a row is a JSON object, this line holds a list$",
    ),
    (
        lambda p: _text(p / "d.json", '[{"text": "a"},\n {"text": "b"\n]'),
        [],
        r"is invalid: .*d.json, line 3: not valid JSON",
    ),
    (
        lambda p: write(p / "d.jsonl", [{"text": " "}, {"text": ""}] * 4),
        ["task.eval_path=null"],
        r"^task.train_path=.* is invalid: none of its \d+ rows is usable: each 'text' is empty$",
    ),
    (
        lambda p: write(
            p / "d.jsonl",
            [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}, {"text": "z", "label": ""}],
        ),
        ["task.kind=seq_cls", "task.label_field=label"],
        r"^task.label_field='label' is invalid: row 2 has label '' in it; labels are ints or non-empty names$",
    ),
]


def _text(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make,overrides,message", BAD_FILES)
def test_bad_files_are_refused_in_one_line(tmp_path, make, overrides, message):
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=message):
        load_rows(files_task(make(tmp_path / "data"), *overrides))


def test_a_csv_without_its_label_column_exits_2_writing_nothing(tmp_path):
    path = write(tmp_path / "reviews.csv", [{"text": "good", "stars": "pos"}] * 3)
    run_dir = tmp_path / "run"
    result = cli(
        [
            "-m",
            "lora_lab.train",
            "task=files",
            "task.kind=seq_cls",
            f"task.train_path={path}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "is invalid" in line]
    assert len(errors) == 1 and "task.label_field='label'" in errors[0] and "row 0" in errors[0]
    assert not run_dir.exists()  # a refused run leaves no run dir
