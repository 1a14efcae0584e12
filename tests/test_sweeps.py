"""Real Optuna sweeps as Hydra multiruns on the tiny model (subprocesses, SQLite storage in tmp)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import ROOT, SWEEP_FAST, cli
from optuna.trial import TrialState

pytestmark = pytest.mark.slow


def sweep(tmp_path, *overrides, name="s", search="hparams_search=lora", timeout=600):
    sweep_dir = tmp_path / name
    args = [
        "-m",
        "lora_lab.train",
        "-m",
        search,
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        "hydra.sweeper.study_name=study",
        *SWEEP_FAST,
        *overrides,
    ]
    result = cli(args, cwd=tmp_path, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return sweep_dir


def load(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/optuna.db")


def test_study_runs_and_resumes_in_sqlite(tmp_path):
    sweep_dir = sweep(tmp_path, "hydra.sweeper.n_trials=4")
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    for trial in study.trials:  # each trial's value is its job's metric
        metrics = json.loads((sweep_dir / str(trial.number) / "metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["eval/token_accuracy"])
        assert set(trial.params) == {"adapter.r", "adapter.alpha_multiple", "train.lr"}
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(study.best_value)
    summary = yaml.safe_load((sweep_dir / "study_summary.yaml").read_text())
    assert summary["trial_states"]["COMPLETE"] == 4
    assert f"adapter.r={study.best_params['adapter.r']}" in summary["best_command"]

    resumed = sweep(tmp_path, "hydra.sweeper.n_trials=2", name="resumed")
    study = load(tmp_path)
    assert len(study.trials) == 6 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sorted(p.name for p in resumed.iterdir() if p.name.isdigit()) == ["4", "5"]


def test_pruner_prunes_trials(tmp_path):
    # token accuracy of a barely trained tiny model is far below 0.99: every trial is pruned at its first report
    sweep(
        tmp_path,
        "hydra.sweeper.n_trials=2",
        "train.eval_on_start=false",
        "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, lower: 0.99}",
    )
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(t.intermediate_values and max(t.intermediate_values) == 5 for t in study.trials)


def test_failing_trial_fails_alone(tmp_path):
    sweep_dir = sweep(
        tmp_path,
        "hydra/sweeper/sampler=grid",
        "train.lr=choice(0.003,-1.0)",
        "adapter.r=choice(4,8)",
        search="hydra/sweeper=lora_lab_optuna",
    )
    trials = load(tmp_path).trials
    states = {(t.params["train.lr"], t.params["adapter.r"]): t for t in trials}
    assert len(trials) == len(states) == 4
    for (lr, _), trial in states.items():
        if lr < 0:
            assert trial.state == TrialState.FAIL
            assert "train.lr=-1.0" in trial.user_attrs["fail_reason"]
            assert not (sweep_dir / str(trial.number) / "metrics.json").exists()
        else:
            assert trial.state == TrialState.COMPLETE


def test_killed_sweep_leaves_running_trial_marked_fail_on_resume(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-m",
        "lora_lab.train",
        "-m",
        "hparams_search=lora",
        f"hydra.sweep.dir={tmp_path}/killed",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        "hydra.sweeper.study_name=study",
        "hydra.sweeper.n_trials=2",
        "train.max_steps=100000",
        "train.eval_steps=100000",
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "0" / "train.log").exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [t.state for t in load(tmp_path).trials] == [TrialState.RUNNING]

    sweep(tmp_path, "hydra.sweeper.n_trials=1", name="resumed")
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "interrupted" in trials[0].user_attrs["fail_reason"]


def test_multi_objective_writes_the_pareto_front(tmp_path):
    sweep_dir = sweep(
        tmp_path,
        "hydra.sweeper.n_trials=3",
        "optimized_metric=[eval/token_accuracy,params/trainable]",
        "hydra.sweeper.direction=[maximize,minimize]",
    )
    front = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["solutions"]
    assert front and all(len(s["values"]) == 2 for s in front)
    study = load(tmp_path)
    assert {tuple(t.values) for t in study.best_trials} == {tuple(s["values"]) for s in front}


def test_parallel_trials_with_the_joblib_launcher(tmp_path):
    sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
    )
    assert [t.state for t in load(tmp_path).trials] == [TrialState.COMPLETE] * 2


def test_two_workers_share_one_study_on_postgresql(tmp_path, postgres_url):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = [
        "-m",
        "lora_lab.train",
        "-m",
        "hparams_search=lora",
        f"hydra.sweeper.storage={postgres_url}",
        "hydra.sweeper.study_name=shared",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.fail_stale_running=false",
        *SWEEP_FAST,
    ]
    workers = [
        subprocess.Popen(
            [sys.executable, *common, f"hydra.sweep.dir={tmp_path}/worker{i}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        out, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    ran = [yaml.safe_load(p.read_text()) for p in tmp_path.glob("worker*/*/.hydra/overrides.yaml")]
    numbers = sorted(
        int(o.split("=")[1]) for overrides in ran for o in overrides if o.startswith("++optuna_trial.number=")
    )
    assert numbers == list(range(6))  # every trial ran exactly once, in one of the workers


def test_parallel_trials_with_the_submitit_launcher(tmp_path):
    """The launcher behind Slurm sweeps, run with its local executor: each trial a separate job process."""
    sweep_dir = sweep(
        tmp_path,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
    )
    assert [t.state for t in load(tmp_path).trials] == [TrialState.COMPLETE] * 2
    assert len([p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]) == 2  # one job each


def _open_study_at_once(barrier, storage: str, study_name: str) -> None:
    from hydra_plugins.lora_lab_sweeper.lora_lab_sweeper import create_or_load_study

    barrier.wait()
    create_or_load_study(study_name=study_name, storage=storage, directions=["minimize"])


def test_workers_starting_together_on_an_empty_postgresql_database_all_open_the_study(postgres_url):
    """The race behind a flaky two-worker run: workers creating Optuna's tables at once lose it with
    a unique violation, a duplicate table or a duplicate type. Twelve workers per round, each round
    on a fresh database (retrying unique violations alone failed this); each must open the study."""
    import multiprocessing

    import psycopg

    context = multiprocessing.get_context("spawn")
    for round_ in range(5):
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE race{round_}")
        storage = postgres_url.rsplit("/", 1)[0] + f"/race{round_}"
        barrier = context.Barrier(12)
        workers = [
            context.Process(target=_open_study_at_once, args=(barrier, storage, "raced")) for _ in range(12)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [w.exitcode for w in workers] == [0] * 12
        assert optuna.get_all_study_names(storage=storage) == ["raced"]
