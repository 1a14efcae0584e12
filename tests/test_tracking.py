"""W&B offline runs, read back from their transaction logs with `wandb leet inspect`."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from conftest import FAST, cli, read_metrics, train_run
from optuna.trial import TrialState

from lora_lab.trainer import TrainingDiverged


def inspect(run_dir) -> tuple[dict, dict]:
    """(summary view, the 'run' record) of the one W&B offline run under run_dir."""
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    wandb = [sys.executable, "-m", "wandb", "leet", "inspect"]
    summary = json.loads(
        subprocess.run(
            [*wandb, "--summary", "--json", str(runs[0])], capture_output=True, text=True, check=True
        ).stdout
    )
    records = subprocess.run(
        [*wandb, "--json", str(runs[0])], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    run_record = next(json.loads(r)["run"] for r in records if '"type":"run"' in r)
    return summary, run_record


@pytest.mark.slow
def test_sweep_leaves_one_finished_offline_run_per_trial_grouped_by_study(tmp_path):
    sweep_dir = tmp_path / "s"
    result = cli(
        [
            "-m",
            "lora_lab.train",
            "-m",
            "hydra/sweeper=lora_lab_optuna",
            "logger=wandb",
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
            "hydra.sweeper.study_name=study",
            "hydra/sweeper/sampler=grid",
            "adapter.r=choice(4,8)",
            "model.attn_implementation=choice(sdpa,no_such_kernel)",
            "hydra.sweeper.n_trials=3",
            "train.max_steps=6",
            "train.eval_steps=3",
            "task.max_eval_samples=16",
            "task.metrics=[token_accuracy]",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.trials) == 3
    run_ids = set()
    for trial in study.trials:
        job = sweep_dir / str(trial.number)
        summary, record = inspect(job)
        run_ids.add(record["run_id"])
        assert record["run_group"] == "study" and record["job_type"] == "trial"
        config = record["config"]["update"]
        assert config["adapter"]["r"] == trial.params["adapter.r"]
        assert config["model"]["attn_implementation"] == trial.params["model.attn_implementation"]
        assert f"r={trial.params['adapter.r']}" in record["tags"]
        if trial.state == TrialState.COMPLETE:
            metrics = read_metrics(job)
            assert summary["summary"]["eval/token_accuracy"] == pytest.approx(metrics["eval/token_accuracy"])
            assert summary["summary"]["params/trainable"] == metrics["params/trainable"]
            assert any(k.startswith("lora/") and k.endswith("/effective_rank") for k in summary["summary"])
            assert summary["exit_code"] == 0
        else:  # the failing trial finished its run too, marked failed with the reason
            assert trial.state == TrialState.FAIL
            assert summary["exit_code"] == 1
            assert (
                summary["summary"]["state"] == "failed" and "no_such_kernel" in summary["summary"]["reason"]
            )
    assert len(run_ids) == 3  # each trial logged into its own run
    # one config_id per configuration: the trials differ in adapter.r or attention
    config_ids = {
        inspect(sweep_dir / str(t.number))[1]["config"]["update"]["config_id"] for t in study.trials
    }
    assert len(config_ids) == 3
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.FAIL}


def test_single_run_logs_quant_error_table_and_prints_sync_command(tmp_path):
    result = cli(
        ["-m", "lora_lab.train", "logger=wandb", "quant=nf4", *FAST, f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb sync" in result.stdout + result.stderr
    summary, record = inspect(tmp_path / "run")
    assert record["job_type"] == "train" and record["run_group"] == "train"
    assert "quant_error" in summary["summary"] and "lora_diagnostics" in summary["summary"]
    assert summary["summary"]["eval/loss"] == pytest.approx(read_metrics(tmp_path / "run")["eval/loss"])


def test_nan_loss_stops_the_run_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingDiverged, match="train loss is nan"):
        train_run(
            ["train.lr=1e30", "train.max_steps=20", "train.logging_steps=1", "train.eval_on_start=false"],
            tmp_path,
        )
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "adapter").exists()


def test_logger_mode_auto_goes_online_only_with_a_saved_or_given_key(tmp_path, monkeypatch):
    from lora_lab.tracking import has_wandb_credentials

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_wandb_credentials()  # no ~/.netrc at all
    (tmp_path / "netrc").write_text("machine example.org login user password secret\n")
    assert not has_wandb_credentials()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert has_wandb_credentials()


def test_config_id_is_shared_by_the_seeds_of_one_configuration_only():
    from dataclasses import asdict

    from conftest import compose

    from lora_lab.tracking import config_id
    from lora_lab.validate import validate

    def run_id(*overrides):
        return config_id(asdict(validate(compose(list(overrides)))))

    seed_1 = run_id("train.seed=1", "optuna_trial.number=3", "logger.project=x")
    assert seed_1 == run_id("train.seed=2")
    assert seed_1 != run_id("train.seed=1", "train.lr=1e-3") and seed_1 != run_id("adapter.r=4")
