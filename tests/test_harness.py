"""lm-evaluation-harness on the trained adapter in memory (lora_lab/harness.py), offline: local tasks
over JSONL files of sort prompts, checked against lora_lab's own exact match and a hand-computed
multiple-choice accuracy."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, load_study, read_metrics, sweep, write_jsonl
from optuna.trial import TrialState

from lora_lab.config import HarnessConfig
from lora_lab.tasks.builtin import sort_rows

# The module fixture is one costly run: its tests go to one xdist worker (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("harness_run")

pytest.importorskip("lm_eval", reason="lm-evaluation-harness: pip install 'lora_lab[harness]'")

EVAL_PROMPTS = 32
MAX_NEW_TOKENS = 12  # conf/task/sort.yaml's task.generate_max_new_tokens
# The sort task scored on its first digit (the smallest), which a few dozen steps teach the tiny model
# to get right for some prompts but not all: an exact match strictly between 0 and 1, which a
# decoding or an answer extraction that differs from lora_lab's would not reproduce.
ANSWER_PATTERN = "([0-9])"
RUN = [
    "train.max_steps=60",
    "train.lr=1e-2",
    "train.eval_steps=60",
    "train.logging_steps=20",
    "train.eval_on_start=false",
    f"task.max_eval_samples={EVAL_PROMPTS}",
    f"task.answer_pattern='{ANSWER_PATTERN}'",
]

# The eval prompts as a generate_until task, decoded as lora_lab decodes: greedy, stopped at EOS only
# (lm-eval always adds it), at most as many new tokens. The answer is extracted as lora_lab extracts
# it, the first match of the pattern (lm-eval's regex filter, named first_digit), and compared with
# the reference's own first match.
GENERATE_TASK = """\
task: sort_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{response.split()[0]}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_new_tokens}
  do_sample: false
filter_list:
  - name: first_digit
    filter:
      - function: regex
        regex_pattern: "{pattern}"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
# The eval prompts as a multiple-choice task: the sorted list against two wrong orders.
CHOICE_TASK = """\
task: sort_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def choice_rows() -> list[dict]:
    rng = random.Random(0)
    rows = []
    for row in sort_rows("eval")[:EVAL_PROMPTS]:
        digits = row["prompt"].removeprefix("sort ").removesuffix(" :").split()
        right = " ".join(sorted(digits))
        wrong = [" ".join(sorted(digits, reverse=True)), " ".join(digits)]
        wrong = [w for w in dict.fromkeys(wrong) if w != right] or [" ".join(["0", *sorted(digits)])]
        choices = [right, *wrong]
        rng.shuffle(choices)
        rows.append({"prompt": row["prompt"], "choices": choices, "gold": choices.index(right)})
    return rows


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A folder of task YAMLs (harness.include_path) over JSONL files of the run's eval prompts."""
    folder = tmp_path_factory.mktemp("harness_tasks")
    prompts = write_jsonl(folder / "sort.jsonl", sort_rows("eval")[:EVAL_PROMPTS])
    choices = write_jsonl(folder / "sort_choice.jsonl", choice_rows())
    (folder / "sort_generate.yaml").write_text(
        GENERATE_TASK.format(data=prompts, max_new_tokens=MAX_NEW_TOKENS, pattern=ANSWER_PATTERN)
    )
    (folder / "sort_choice.yaml").write_text(CHOICE_TASK.format(data=choices))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, task_dir) -> Path:
    """One run of the sort task (from the command line, as users run it: a run dir that
    lora_lab.evaluate can reload) scored by the harness on both tasks, before training too."""
    run_dir = tmp_path_factory.mktemp("harness_run")
    result = cli(
        [
            "-m",
            "lora_lab.train",
            f"hydra.run.dir={run_dir}",
            *RUN,
            f"harness.include_path={task_dir}",
            "harness.tasks=[sort_generate,sort_choice]",
            "harness.baseline=true",
            "harness.batch_size=16",
        ],
        cwd=run_dir.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_generate_until_exact_match_is_lora_labs(trained):
    metrics = read_metrics(trained)
    assert 0 < metrics["eval/exact_match"] < 1
    score = metrics["harness/sort_generate/exact_match_first_digit"]
    assert score == pytest.approx(metrics["eval/exact_match"])
    assert "harness/sort_generate/exact_match_stderr_first_digit" in metrics
    assert not any("," in name for name in metrics)


@torch.no_grad()
def choice_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Multiple-choice accuracy by hand: the choice (after a space) with the highest summed log
    probability of its tokens given the prompt."""
    right = 0
    for row in rows:
        context = tokenizer(row["prompt"])["input_ids"]
        scores = []
        for choice in row["choices"]:
            ids = tokenizer(row["prompt"] + " " + choice)["input_ids"]
            log_probs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(log_probs[i - 1, ids[i]]) for i in range(len(context), len(ids))))
        right += int(np.argmax(scores)) == row["gold"]
    return right / len(rows)


@pytest.mark.slow
def test_multiple_choice_accuracy_by_hand(trained, task_dir):
    from lora_lab.harness import Harness
    from lora_lab.runs import load_run

    metrics = read_metrics(trained)
    model, tokenizer, _ = load_run(trained, "cpu")
    rows = choice_rows()
    accuracy = choice_accuracy(model, tokenizer, rows)
    assert metrics["harness/sort_choice/acc"] == pytest.approx(accuracy)
    # The untrained adapter (B = 0) computes the base model: its accuracy is the baseline's.
    with model.disable_adapter():
        untrained = choice_accuracy(model, tokenizer, rows)
    assert metrics["baseline_harness/sort_choice/acc"] == pytest.approx(untrained)
    assert untrained != accuracy

    # Scoring again in process gives the same accuracy and leaves the caller's random streams as
    # they were (lm-eval seeds them all): a baseline scored before training changes no draw of it.
    harness = Harness(HarnessConfig(tasks=["sort_choice"], include_path=str(task_dir)))
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = (torch.rand(3).tolist(), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    again = harness.score(model, tokenizer)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected
    assert again["harness/sort_choice/acc"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_evaluate_adds_scores_to_a_finished_run(trained, task_dir, tmp_path):
    from lora_lab.runs import load_run

    before = read_metrics(trained)
    result = cli(
        [
            "-m",
            "lora_lab.evaluate",
            str(trained),
            f"harness.include_path={task_dir}",
            "harness.tasks=[sort_choice]",
            "harness.limit=8",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model, tokenizer, _ = load_run(trained, "cpu")
    first_eight = choice_accuracy(model, tokenizer, choice_rows()[:8])
    assert f"harness/sort_choice/acc\t{first_eight:.4f}" in result.stdout
    after = read_metrics(trained)
    rescored = {"harness/sort_choice/acc", "harness/sort_choice/acc_stderr"}
    assert after["harness/sort_choice/acc"] == pytest.approx(first_eight)
    assert set(after) == set(before)
    assert {k: v for k, v in after.items() if k not in rescored} == {
        k: v for k, v in before.items() if k not in rescored
    }
    assert list(tmp_path.iterdir()) == []  # lm-eval wrote nothing in the working directory


@pytest.mark.slow
def test_sweep_optimises_a_harness_metric(tmp_path, task_dir):
    sweep(
        tmp_path,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.direction=maximize",
        f"harness.include_path={task_dir}",
        "harness.tasks=[sort_choice]",
        "harness.limit=16",
        "optimized_metric=harness/sort_choice/acc",
    )
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for trial in study.trials:
        metrics = read_metrics(tmp_path / "s" / str(trial.number))
        assert trial.value == pytest.approx(metrics["harness/sort_choice/acc"])


def test_hub_task_offline_names_task_and_include_path(tmp_path):
    result = cli(
        ["-m", "lora_lab.train", f"hydra.run.dir={tmp_path / 'run'}", "harness.tasks=[hellaswag]"],
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "harness.tasks" in line]
    assert len(errors) == 1 and "'hellaswag'" in errors[0] and "harness.include_path" in errors[0]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_report_shows_harness_scores_as_columns(trained, tmp_path):
    import csv

    from lora_lab.report import report

    report(str(trained), None, str(tmp_path))
    (row,) = csv.DictReader((tmp_path / "report.csv").read_text().splitlines())
    metrics = read_metrics(trained)
    for name in ("harness/sort_choice/acc", "baseline_harness/sort_choice/acc"):
        assert float(row[name]) == pytest.approx(metrics[name])
    assert not any("_stderr" in column for column in row)
