"""Evaluation metrics against independent computations: cross-entropy summed by hand, scikit-learn's F1,
greedy decoding one prompt at a time, and the values a pruner received, read back from Optuna's storage."""

from __future__ import annotations

import logging
import math

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_EVAL, compose, read_metrics, train_run, write_jsonl
from omegaconf import OmegaConf
from peft import PeftModel
from sklearn.metrics import f1_score
from transformers import EvalPrediction

from lora_lab.data import IGNORE_INDEX, build_task_data
from lora_lab.errors import ConfigError
from lora_lab.metric_names import check_metric_names
from lora_lab.metrics import ExactMatchScorer, step_metrics_fn
from lora_lab.models import byte_level_tokenizer, load_model
from lora_lab.pipeline import train
from lora_lab.pruning import pruning_callback
from lora_lab.tasks import load_rows
from lora_lab.validate import validate


def trained_model(overrides: list[str], run_dir):
    run = validate(compose(overrides))
    base, tokenizer = load_model(run.model, run.quant, run.task.labels, "cpu")
    return PeftModel.from_pretrained(base, run_dir / "adapter").eval(), tokenizer, run


def sweep_job(tmp_path, overrides: list[str], pruner: dict, direction: str):
    """A run as a sweep job runs it, as a trial of a study in SQLite. Returns the run's metrics (None if
    the trial was pruned) and the values the trial reported, read back from the storage."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction=direction)
    trial = study.ask()
    job = [
        *overrides,
        "optuna_trial.study_name=s",
        f"optuna_trial.storage={storage}",
        f"optuna_trial.trial_id={trial._trial_id}",
        f"optuna_trial.number={trial.number}",
    ]
    (tmp_path / "run").mkdir()
    try:
        metrics = train(validate(compose(job), job), tmp_path / "run", pruner_cfg=OmegaConf.create(pruner))
    except optuna.TrialPruned as pruned:
        metrics = {"pruned": str(pruned)}
    reported = optuna.load_study(study_name="s", storage=storage).trials[0].intermediate_values
    return metrics, reported


PERPLEXITY_JOB = [
    "train.max_steps=10",
    "train.eval_steps=5",
    "train.eval_on_start=false",
    "task.max_eval_samples=16",  # one eval batch
    "task.metrics=[token_accuracy,perplexity]",
    "task.metric=perplexity",
    "task.metric_direction=minimize",
]


def test_pruner_gets_perplexity_at_each_evaluation(tmp_path):
    metrics, reported = sweep_job(
        tmp_path, PERPLEXITY_JOB, {"_target_": "optuna.pruners.NopPruner"}, "minimize"
    )
    assert sorted(reported) == [5, 10]
    model, tokenizer, run = trained_model(PERPLEXITY_JOB, tmp_path / "run")
    data = build_task_data(*load_rows(run.task), run.task.format, tokenizer, run.task.max_length, False)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in data.eval:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(example["labels"][1:])
            scored = labels != IGNORE_INDEX
            total += float(F.cross_entropy(logits[scored], labels[scored], reduction="sum"))
            count += int(scored.sum())
    assert reported[10] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert metrics["eval/perplexity"] == pytest.approx(reported[10], rel=1e-6)
    assert reported[5] > reported[10]  # trained between the two evaluations


def test_pruner_prunes_on_perplexity(tmp_path):
    # perplexity is never below 1: the first report prunes, and training stops there
    metrics, reported = sweep_job(
        tmp_path, PERPLEXITY_JOB, {"_target_": "optuna.pruners.ThresholdPruner", "upper": 1.0}, "minimize"
    )
    assert "pruned at step 5 with eval/perplexity=" in metrics["pruned"]
    assert list(reported) == [5] and reported[5] > 1.0
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_pruner_gets_exact_match_of_a_fixed_subsample_at_each_evaluation(tmp_path, caplog):
    # The model learns to answer " yes"; the first 64 eval prompts (the subsample) expect it, the rest " no".
    train_rows = [{"prompt": f"is {i} a number ?", "response": " yes"} for i in range(64)]
    eval_rows = [{"prompt": f"is {i} a number ?", "response": " yes" if i < 64 else " no"} for i in range(70)]
    job = [
        "task=jsonl",
        f"task.train_path={write_jsonl(tmp_path / 'train.jsonl', train_rows)}",
        f"task.eval_path={write_jsonl(tmp_path / 'eval.jsonl', eval_rows)}",
        "task.metrics=[exact_match]",
        "task.metric=exact_match",
        "task.metric_direction=maximize",
        "task.generate_max_new_tokens=4",
        "train.lr=1e-2",
        "train.max_steps=12",
        "train.eval_steps=6",
        "train.eval_on_start=false",
    ]
    with caplog.at_level(logging.INFO, logger="lora_lab"):
        metrics, reported = sweep_job(tmp_path, job, {"_target_": "optuna.pruners.NopPruner"}, "maximize")
    assert "eval/exact_match of the first 64 of 70 eval prompts" in caplog.text
    assert sorted(reported) == [6, 12]

    model, tokenizer, _ = trained_model(job, tmp_path / "run")
    hits = []
    with torch.no_grad():
        for row in eval_rows:
            prompt = tokenizer(row["prompt"], return_tensors="pt")
            generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
            answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
            hits.append(answer.strip() == row["response"].strip())
    subsample, everything = sum(hits[:64]) / 64, sum(hits) / 70
    assert subsample != everything  # the inputs tell the subsample from the whole eval set
    assert reported[12] == pytest.approx(subsample)
    assert metrics["eval/exact_match"] == pytest.approx(everything)


@pytest.mark.parametrize(
    "objectives,reason",
    [
        (["eval/token_accuracy", "params/trainable"], "Optuna cannot prune a multi-objective study"),
        (["memory/peak_gib"], "memory/peak_gib is measured at the end of a run"),
    ],
)
def test_a_pruner_that_cannot_prune_says_why(objectives, reason, caplog):
    trial = optuna.create_study(directions=["maximize"] * len(objectives)).ask()
    score_exact_match = ExactMatchScorer(byte_level_tokenizer(), [], [], None, 4, 1)
    with caplog.at_level(logging.WARNING, logger="lora_lab"):
        assert pruning_callback(trial, objectives, score_exact_match) is None
    assert f"hydra.sweeper.pruner is not used: {reason}" in caplog.text


def test_f1_names_its_positive_label_and_matches_scikit_learn():
    labels = ["negative", "positive"]
    references = np.array([0, 0, 0, 1, 1, 0, 1, 0, 0])
    predictions = np.array([0, 1, 0, 1, 0, 0, 1, 1, 0])
    compute = step_metrics_fn("seq_cls", ["accuracy", "f1_negative", "f1_positive", "f1_macro"], labels)
    expected = {
        "accuracy": float(np.mean(references == predictions)),
        "f1_negative": f1_score(references, predictions, pos_label=0),
        "f1_positive": f1_score(references, predictions, pos_label=1),
        "f1_macro": f1_score(references, predictions, average="macro"),
    }
    assert len({round(v, 9) for v in expected.values()}) == 4  # a wrong F1 gives a different number
    assert compute(EvalPrediction(predictions=predictions, label_ids=references)) == pytest.approx(expected)


def test_f1_names_are_checked_against_the_labels():
    with pytest.raises(ConfigError, match="'f1' is not available.*f1_negative, f1_positive, f1_macro"):
        check_metric_names("seq_cls", ["accuracy", "f1"], "accuracy", ["negative", "positive"])
    with pytest.raises(ConfigError, match="'f1_cat' is not available.*valid: accuracy, f1_macro"):
        check_metric_names("seq_cls", ["f1_cat"], "accuracy", ["cat", "dog", "bird"])


def test_macro_f1_of_three_labels_matches_scikit_learn(tmp_path):
    words = {"red": "warm", "blue": "cold", "grey": "neutral"}
    rows = [{"text": f"the {w} one", "label": words[w]} for w in ["red", "blue", "grey", "red"] * 6]
    # Unbalanced, with labels the text cannot tell apart: macro F1 differs from accuracy (micro F1).
    labelled = [("red", "warm")] * 4 + [("blue", "cold")] * 2 + [("grey", "neutral"), ("grey", "warm")]
    eval_rows = [{"text": f"the {w} one", "label": label} for w, label in [*labelled, ("red", "cold")]]
    overrides = [
        "task=jsonl",
        f"task.train_path={write_jsonl(tmp_path / 'train.jsonl', rows)}",
        f"task.eval_path={write_jsonl(tmp_path / 'eval.jsonl', eval_rows)}",
        "task.kind=seq_cls",
        "task.format=cls",
        "task.labels=[warm,cold,neutral]",
        "task.metrics=[accuracy,f1_macro]",
        "task.metric=f1_macro",
        "task.metric_direction=maximize",
        "train.max_steps=6",
        "train.eval_steps=6",
        "train.eval_on_start=false",
    ]
    metrics = train_run(overrides, tmp_path / "run")
    model, tokenizer, run = trained_model(overrides, tmp_path / "run")
    _, eval_rows = load_rows(run.task)
    with torch.no_grad():
        predictions = [
            int(model(**tokenizer(r["text"], return_tensors="pt")).logits.argmax()) for r in eval_rows
        ]
    references = [r["label"] for r in eval_rows]
    assert metrics["eval/f1_macro"] == pytest.approx(f1_score(references, predictions, average="macro"))
    assert metrics["eval/f1_macro"] != pytest.approx(metrics["eval/accuracy"])  # macro, not micro
    assert read_metrics(tmp_path / "run")["eval/f1_macro"] == pytest.approx(metrics["eval/f1_macro"])


def test_trainer_bookkeeping_stays_out_of_metrics_json(tmp_path):
    """An evaluate-only run: the Trainer then adds eval_model_preparation_time to its eval metrics."""
    first = [*SMALL_EVAL, "train.max_steps=2", "train.eval_steps=2"]
    train_run(first, tmp_path / "first")
    train_run(
        [*SMALL_EVAL, f"adapter.init_from={tmp_path}/first/adapter", "train.max_steps=0"], tmp_path / "run"
    )
    evaluated = {k for k in read_metrics(tmp_path / "run") if k.startswith("eval/")}
    assert evaluated == {"eval/loss", "eval/token_accuracy"}
