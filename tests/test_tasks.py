"""Task formatting on local rows shaped like the hub datasets, the user's JSONL files, and tokenisation."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, compose, train_run, write_jsonl

from lora_lab.data import IGNORE_INDEX, tokenize_lm, tokenize_sft
from lora_lab.errors import ConfigError
from lora_lab.metric_names import check_metric_names
from lora_lab.metrics import exact_match
from lora_lab.models import byte_level_tokenizer
from lora_lab.tasks import format_row, load_rows
from lora_lab.validate import validate


def task(name: str, *overrides: str):
    return validate(compose([f"task={name}", *overrides])).task


def test_gsm8k_rows_format_and_score_on_the_first_answer_as_a_number():
    row = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
    formatted = format_row(task("gsm8k", "model.kind=causal_lm"), row, 0)
    assert formatted == {
        "prompt": "Question: Tom has 3 apples and buys 4. How many?\nAnswer:",
        "response": " 3 + 4 = <<3+4=7>>7\n#### 7",
    }
    pattern = task("gsm8k").answer_pattern
    scored = {  # generation, reference: a hit?
        ("so 3+4 is 7\n#### 7\n\nQuestion: And 5 more?\nAnswer: 7+5=12\n#### 12", "#### 7"): True,
        ("#### 1,000.00", "#### 1000"): True,
        ("#### 0.50", "#### .5"): True,
        ("#### 12\n\nQuestion: Half of it?\nAnswer: #### 6", "#### 6"): False,
        ("#### 7.5", "#### 75"): False,
        ("#### -3", "#### 3"): False,
        ("no idea", "#### 5"): False,
    }
    predictions, references = zip(*scored, strict=True)
    hits = sum(scored.values())
    assert exact_match(list(predictions), list(references), pattern) == pytest.approx(hits / len(scored))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml")))
def test_task_presets_name_metrics_that_exist(name):
    t = compose([f"task={name}"]).task
    check_metric_names(t.kind, list(t.metrics), t.metric, list(t.labels))


def test_alpaca_rows_use_the_template_with_and_without_input():
    t = task("alpaca")
    with_input = format_row(t, {"instruction": "Translate.", "input": "bonjour", "output": "hello"}, 0)
    assert "### Input:\nbonjour" in with_input["prompt"] and with_input["prompt"].endswith("### Response:\n")
    assert with_input["response"] == "hello"
    without = format_row(t, {"instruction": "Say hi.", "input": "", "output": "hi"}, 0)
    assert "### Input" not in without["prompt"]


@pytest.mark.parametrize(
    "name,row,expected",
    [
        (
            "sst2",
            {"sentence": "a gorgeous film", "label": 1, "idx": 0},
            {"text": "a gorgeous film", "text_pair": None, "label": 1},
        ),
        (
            "mrpc",
            {"sentence1": "A b.", "sentence2": "B a.", "label": 0, "idx": 3},
            {"text": "A b.", "text_pair": "B a.", "label": 0},
        ),
        (
            "rte",
            {"sentence1": "It rains.", "sentence2": "It is wet.", "label": 0, "idx": 1},
            {"text": "It rains.", "text_pair": "It is wet.", "label": 0},
        ),
    ],
)
def test_glue_rows_format(name, row, expected):
    assert format_row(task(name), row, 0) == expected


def test_wikitext_rows_pack_into_blocks():
    tokenizer = byte_level_tokenizer()
    rows = [
        {"text": " = Valkyria = \n"},
        {"text": ""},
        {"text": " The game began development in 2010 . \n" * 4},
    ]
    formatted = [format_row(task("wikitext2"), r, i) for i, r in enumerate(rows)]
    blocks = tokenize_lm([r for r in formatted if r["text"].strip()], tokenizer, 32)
    assert len(blocks) >= 4 and all(len(b["input_ids"]) == 32 for b in blocks)
    assert all(b["labels"] == b["input_ids"] for b in blocks)


def test_sft_loss_is_on_the_response_only():
    tokenizer = byte_level_tokenizer()
    example = tokenize_sft([{"prompt": "sort 2 1 :", "response": " 1 2"}], tokenizer, 64)[0]
    prompt_len = len(tokenizer("sort 2 1 :")["input_ids"])
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tokenizer.decode(example["labels"][prompt_len:]) == " 1 2</s>"


def test_jsonl_sft_task_trains(tmp_path):
    rows = [{"question": f"double {i}", "answer": f" {2 * i}"} for i in range(40)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:32])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[32:])
    metrics = train_run(
        [
            "task=jsonl",
            f"task.train_path={train}",
            f"task.eval_path={dev}",
            "task.prompt_field=question",
            "task.response_field=answer",
            "train.max_steps=8",
            "train.eval_steps=4",
        ],
        tmp_path / "run",
    )
    assert metrics["eval/loss"] < metrics["baseline/loss"]


def test_jsonl_classification_with_label_names(tmp_path):
    rows = [
        {"review": f"{w} stuff", "stars": "pos" if w == "nice" else "neg"} for w in ["nice", "awful"] * 10
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    overrides = [
        "task=jsonl",
        f"task.train_path={path}",
        f"task.eval_path={path}",
        "task.kind=seq_cls",
        "task.format=cls",
        "task.text_field=review",
        "task.label_field=stars",
        "task.labels=[neg,pos]",
        "task.metrics=[accuracy]",
        "task.metric=accuracy",
    ]
    train_rows, _ = load_rows(validate(compose(overrides)).task)
    assert [r["label"] for r in train_rows[:2]] == [1, 0]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"review": "x", "stars": "meh"}])
    with pytest.raises(ConfigError, match="'meh'"):
        load_rows(
            validate(
                compose(overrides[:1] + [f"task.train_path={bad}", f"task.eval_path={bad}"] + overrides[3:])
            ).task
        )


def test_jsonl_rows_of_no_shape_name_their_fields_and_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(
        ConfigError, match="row 0 has fields q, a, .*prompt_response: prompt, response.*task.prompt_field"
    ):
        load_rows(validate(compose(["task=jsonl", f"task.train_path={path}", f"task.eval_path={path}"])).task)
    sft = ["task.format=sft", "task.prompt_field=q", "task.response_field=answer"]
    with pytest.raises(ConfigError, match="task.response_field='answer'.*fields: q, a"):
        load_rows(
            validate(compose(["task=jsonl", f"task.train_path={path}", f"task.eval_path={path}", *sft])).task
        )
