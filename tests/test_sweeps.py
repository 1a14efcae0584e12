"""Real Optuna sweeps as Hydra multiruns on the tiny model (CLI processes, SQLite storage in tmp)."""

from __future__ import annotations

import csv
import datetime
import json
import os
import shutil
import signal
import time
from pathlib import Path

import optuna
import pytest
import yaml
from cli_process import CliProcess, context
from conftest import (
    CONF_DIR,
    ROOT,
    SWEEP_FAST,
    cli,
    load_study,
    run_sweep,
    start_cli,
    sweep,
    sweep_output,
)
from optuna.trial import TrialState

pytestmark = pytest.mark.slow
# Heartbeats a test can wait out: one a second, a trial without one for 2 s is stale.
HEARTBEAT = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"]


def test_study_runs_and_resumes_in_sqlite(tmp_path):
    output = sweep_output(tmp_path, "hydra.sweeper.n_trials=4")
    sweep_dir = tmp_path / "s"
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    # one progress line per trial, with the best so far; none of Optuna's own lines
    for trial in study.trials:
        best = max(study.trials[: trial.number + 1], key=lambda t: t.value)
        assert (
            f"trial {trial.number} COMPLETE value {trial.value:.4g} ({trial.number + 1} of 4 in this sweep; "
            f"best {best.value:.4g}, trial {best.number})" in output
        )
    assert "new study study in sqlite:///" in output
    assert "A new study created" not in output and "Using an existing study" not in output
    for trial in study.trials:  # each trial's value is its job's metric
        metrics = json.loads((sweep_dir / str(trial.number) / "metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["eval/token_accuracy"])
        assert set(trial.params) == {"adapter.r", "adapter.alpha_multiple", "train.lr"}
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(study.best_value)
    summary = yaml.safe_load((sweep_dir / "study_summary.yaml").read_text())
    assert summary["trial_states"]["COMPLETE"] == 4
    assert f"adapter.r={study.best_params['adapter.r']}" in summary["best_command"]

    output = sweep_output(tmp_path, "hydra.sweeper.n_trials=2", name="resumed")
    resumed = tmp_path / "resumed"
    assert "resuming study study with 4 earlier trials" in output and "trial 5 COMPLETE" in output
    assert "(2 of 2 in this sweep; best" in output  # trial ids as stored, counts of this sweep
    study = load_study(tmp_path)
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
    study = load_study(tmp_path)
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
    trials = load_study(tmp_path).trials
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
    args = [
        "-m",
        "lora_lab.train",
        "-m",
        "hparams_search=lora",
        f"hydra.sweep.dir={tmp_path}/killed",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        "hydra.sweeper.study_name=study",
        "hydra.sweeper.n_trials=2",
        *HEARTBEAT,
        *SWEEP_FAST,  # the resumed sweep's settings: a study resumes only with the settings it ran with
    ]
    proc = start_cli(args, tmp_path, tmp_path / "killed.log", new_session=True)
    train_log = tmp_path / "killed" / "0" / "train.log"
    # killed as soon as trial 0's job logs its data sizes, just before it trains for a few seconds
    wait_for(lambda: train_log.exists() and " train / " in train_log.read_text(), "trial 0 to train")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [t.state for t in load_study(tmp_path).trials] == [TrialState.RUNNING]

    time.sleep(3)  # past the grace period (2 s) since the killed trial's last heartbeat
    resumed = sweep_output(tmp_path, "hydra.sweeper.n_trials=1", *HEARTBEAT, name="resumed")
    trials = load_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "trial 0 had no heartbeat for over 2 s" in resumed


def test_multi_objective_writes_the_pareto_front(tmp_path):
    sweep_dir = sweep(
        tmp_path,
        "hydra.sweeper.n_trials=3",
        "optimized_metric=[eval/token_accuracy,params/trainable]",
        "hydra.sweeper.direction=[maximize,minimize]",
    )
    front = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["solutions"]
    assert front and all(len(s["values"]) == 2 for s in front)
    study = load_study(tmp_path)
    assert {tuple(t.values) for t in study.best_trials} == {tuple(s["values"]) for s in front}


def test_parallel_trials_with_the_joblib_launcher(tmp_path):
    sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
    )
    assert [t.state for t in load_study(tmp_path).trials] == [TrialState.COMPLETE] * 2


def test_two_workers_share_one_study_on_postgresql(tmp_path, postgres_url):
    common = [
        "-m",
        "lora_lab.train",
        "-m",
        "hparams_search=lora",
        f"hydra.sweeper.storage={postgres_url}",
        "hydra.sweeper.study_name=shared",
        "hydra.sweeper.n_trials=3",
        *SWEEP_FAST,
    ]
    workers = [
        start_cli([*common, f"hydra.sweep.dir={tmp_path}/worker{i}"], tmp_path, tmp_path / f"worker{i}.log")
        for i in range(2)
    ]
    for worker in workers:
        assert worker.wait(timeout=600) == 0, worker.output()[-3000:]
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
    assert [t.state for t in load_study(tmp_path).trials] == [TrialState.COMPLETE] * 2
    assert len([p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]) == 2  # one job each


def _open_study_at_once(barrier, storage: str, study_name: str) -> None:
    from hydra_plugins.lora_lab_sweeper._storage import create_or_load_study

    barrier.wait()
    create_or_load_study(study_name=study_name, storage=storage, directions=["minimize"])


def test_workers_starting_together_on_an_empty_postgresql_database_all_open_the_study(postgres_url):
    """The race behind a flaky two-worker run: workers creating Optuna's tables at once lose it with
    a unique violation, a duplicate table or a duplicate type. Twelve workers per round, each round
    on a fresh database (retrying unique violations alone failed this); each must open the study."""
    import psycopg

    for round_ in range(3):
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


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# Reports every evaluation to the trial but never prunes: the job itself then writes to the study.
REPORTING_PRUNER = "hydra.sweeper.pruner={_target_: optuna.pruners.MedianPruner, n_startup_trials: 1000}"


@pytest.mark.parametrize("reporting", [False, True], ids=["job-done", "job-reporting"])
def test_trial_ended_by_another_worker_is_logged_and_the_sweep_goes_on(tmp_path, reporting):
    """Another worker (here the test) marks trial 0 FAIL while it trains. Telling its outcome must
    not crash the sweep nor end it early: the sweep logs it and runs trial 1. When the job reports to
    its trial (a pruner), the job fails on the ended trial and the sweep must not crash either."""
    args = [
        "-m",
        "lora_lab.train",
        "-m",
        "hparams_search=lora",
        f"hydra.sweep.dir={tmp_path}/s",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        "hydra.sweeper.study_name=study",
        "hydra.sweeper.n_trials=2",
        *SWEEP_FAST,
        "train.max_steps=20",
        "train.eval_steps=10",
        *([REPORTING_PRUNER] if reporting else []),
    ]
    proc = start_cli(args, tmp_path, tmp_path / "sweep.log")
    wait_for(lambda: (tmp_path / "s" / "0" / "train.log").exists(), "trial 0's job")
    study = load_study(tmp_path)
    study._storage.set_trial_state_values(study.trials[0]._trial_id, state=TrialState.FAIL)
    proc.wait(timeout=600)
    out = proc.output()
    assert proc.returncode == 0, out[-4000:]
    trials = load_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].value == pytest.approx(
        json.loads((tmp_path / "s" / "1" / "metrics.json").read_text())["eval/token_accuracy"]
    )
    assert "trial 0 was already ended FAIL by another worker" in out
    assert "no trial completed" not in out


def test_bad_heartbeat_settings_fail_the_sweep_before_any_trial(tmp_path):
    result = cli(
        [
            "-m",
            "lora_lab.train",
            "-m",
            "hparams_search=lora",
            f"hydra.sweep.dir={tmp_path}/s",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
            "hydra.sweeper.heartbeat_interval=30",
            "hydra.sweeper.grace_period=45",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    (line,) = [line for line in (result.stdout + result.stderr).splitlines() if "is invalid" in line]
    assert "hydra.sweeper.grace_period=45 is invalid: at least twice hydra.sweeper.heartbeat_interval" in line
    assert not (tmp_path / "optuna.db").exists()


PASSWORD = "swp-7Qx2-secret"


@pytest.fixture
def password_postgres_url(postgres_url, monkeypatch):
    """A database on the test server whose role must log in with a password (scram-sha-256), as on
    a shared server; nothing but the URL gives the password (no PGPASSWORD, no ~/.pgpass)."""
    import psycopg

    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        hba = Path(admin.execute("SHOW hba_file").fetchone()[0])
        admin.execute(f"CREATE ROLE sweeper LOGIN PASSWORD '{PASSWORD}'")
        admin.execute("CREATE DATABASE sweeps OWNER sweeper")
        hba.write_text("host all sweeper 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        admin.execute("SELECT pg_reload_conf()")
    server = postgres_url.split("@", 1)[1].rsplit("/", 1)[0]
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://sweeper@{server}/sweeps")
    return f"postgresql://sweeper:{PASSWORD}@{server}/sweeps"


def test_three_workers_one_killed_on_a_shared_password_postgresql_study(tmp_path, password_postgres_url):
    """Three workers with default settings (heartbeats sped up) start at once on one study; one is
    SIGKILLed while it trains. The others must finish all their trials, the killed trial must end
    FAIL once its heartbeat is older than the grace period (a worker started afterwards, if the
    others were done before that), and the password must be in no file and no log."""
    heartbeat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, n_trials: int) -> CliProcess:
        args = [
            "-m",
            "lora_lab.train",
            "-m",
            "hparams_search=lora",
            f"hydra.sweeper.storage={password_postgres_url}",
            "hydra.sweeper.study_name=shared",
            f"hydra.sweeper.n_trials={n_trials}",
            f"hydra.sweep.dir={tmp_path}/{name}",
            "logger=wandb",
            REPORTING_PRUNER,
            *heartbeat,
            *SWEEP_FAST,
        ]
        return start_cli(args, tmp_path, logs / f"{name}.log", new_session=True)

    workers = {name: start(name, 2) for name in ("a", "b", "killed")}

    def training(name: str) -> bool:  # its first job logs its data sizes just before training
        return any(" train / " in log.read_text() for log in tmp_path.glob(f"{name}/*/train.log"))

    wait_for(lambda: training("killed"), "the killed worker's first job to train", timeout=300)
    os.killpg(workers["killed"].pid, signal.SIGKILL)
    killed_at = datetime.datetime.now()
    workers["killed"].wait()
    for name in ("a", "b"):
        workers[name].wait(timeout=600)
    time.sleep(max(0.0, 4 - (datetime.datetime.now() - killed_at).total_seconds()))
    workers["late"] = start("late", 1)
    workers["late"].wait(timeout=600)

    outputs = {name: (logs / f"{name}.log").read_text() for name in workers}
    for name in ("a", "b", "late"):
        assert workers[name].returncode == 0, outputs[name][-4000:]
        assert "Traceback" not in outputs[name], outputs[name][-4000:]
        assert "already ended" not in outputs[name], outputs[name][-4000:]

    study = optuna.load_study(study_name="shared", storage=password_postgres_url)
    jobs = {}  # trial number -> its job dir, from the overrides each job ran with
    for overrides in tmp_path.glob("*/*/.hydra/overrides.yaml"):
        ran = yaml.safe_load(overrides.read_text())
        number = int(next(o for o in ran if o.startswith("++optuna_trial.number=")).split("=")[1])
        assert number not in jobs  # no trial ran twice
        jobs[number] = overrides.parent.parent
    assert sorted(jobs) == sorted(t.number for t in study.trials) == list(range(6))
    (killed,) = [n for n, job in jobs.items() if job.parent.name == "killed"]
    for trial in study.trials:
        if trial.number == killed:
            assert trial.state == TrialState.FAIL
            # failed only once its last heartbeat (at most 1 s before the kill) was 3 s old
            assert (trial.datetime_complete - killed_at).total_seconds() >= 3 - 1
        else:
            assert trial.state == TrialState.COMPLETE, trial
            metrics = json.loads((jobs[trial.number] / "metrics.json").read_text())
            assert trial.value == pytest.approx(metrics["eval/token_accuracy"])
            assert trial.intermediate_values  # the job reached the study, its URL without the password
    stale_logs = [n for n, out in outputs.items() if f"trial {killed} had no heartbeat for over 3 s" in out]
    assert len(stale_logs) == 1, outputs

    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert leaks == []
    # What is written names the storage without its password: masked where it records the setting,
    # left out where it is to connect with (libpq then reads PGPASSWORD or ~/.pgpass).
    hydra_cfg = yaml.safe_load((jobs[0] / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra_cfg["sweeper"]["storage"] == password_postgres_url.replace(PASSWORD, "***")
    summary = yaml.safe_load((tmp_path / "a" / "study_summary.yaml").read_text())
    assert summary["storage"] == password_postgres_url.replace(f":{PASSWORD}", "")


# The repo's arithmetic example as a user's own files, copied so that a test can change them.
ARITHMETIC = [
    "task=jsonl",
    "task.train_path=train.jsonl",
    "task.eval_path=dev.jsonl",
    "task.prompt_field=question",
    "task.response_field=answer",
]


def test_a_study_resumed_with_other_settings_is_refused(tmp_path):
    """Resuming with another objective or direction, another fixed override, or other rows in the
    same data file would mix trials that are not comparable: each is refused in one line naming the
    difference and how to start a new study, before anything runs or is written."""
    for name in ("train.jsonl", "dev.jsonl"):
        shutil.copy(ROOT / "examples" / "arithmetic" / name, tmp_path / name)
    sweep(tmp_path, *ARITHMETIC, "hydra.sweeper.n_trials=1")
    changes = {
        "optimized_metric": ["task.metric=token_accuracy", "task.metric_direction=maximize"],
        "train.warmup_ratio": ["train.warmup_ratio=0.1"],
        "task.eval_path": [],  # same path, other rows (written below)
    }
    for key, changed in changes.items():
        if key == "task.eval_path":
            rows = (tmp_path / "dev.jsonl").read_text().splitlines()
            (tmp_path / "dev.jsonl").write_text("\n".join(rows[:20]) + "\n")
        result = run_sweep(tmp_path, *ARITHMETIC, "hydra.sweeper.n_trials=1", *changed, name=f"refused-{key}")
        out = result.stdout + result.stderr
        assert result.returncode == 2, out[-4000:]
        (line,) = [line for line in out.splitlines() if "hydra.sweeper.study_name='study' is invalid" in line]
        assert key in line and "hydra.sweeper.study_name=<" in line, line
        assert "Traceback" not in out
        assert not (tmp_path / f"refused-{key}").exists()
    study = load_study(tmp_path)
    assert len(study.trials) == 1 and study.direction == optuna.study.StudyDirection.MINIMIZE


def test_resumed_grid_runs_each_point_without_a_complete_trial_once(tmp_path):
    grid = ["adapter.r=choice(4,8)"]
    sweep(tmp_path, *grid, "hydra.sweeper.n_trials=1", name="first", search="experiment=rank_ablation")
    sweep(tmp_path, *grid, name="second", search="experiment=rank_ablation")
    trials = load_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert sorted(t.params["adapter.r"] for t in trials) == [4, 8]

    out = sweep_output(tmp_path, *grid, name="third", search="experiment=rank_ablation")
    assert len(load_study(tmp_path).trials) == 2
    assert "all 2 points of the grid have a finished trial: nothing to run" in out
    assert not any(p.name.isdigit() for p in (tmp_path / "third").iterdir())


def test_resumed_grid_retries_its_failed_point_once_and_fails_when_none_completes(tmp_path):
    grid = ["hydra/sweeper/sampler=grid", "train.lr=choice(0.003,-1.0)"]
    sweep(tmp_path, *grid, search="hydra/sweeper=lora_lab_optuna")  # one of two completes: exit 0
    first = load_study(tmp_path).trials
    assert {t.params["train.lr"]: t.state for t in first} == {0.003: TrialState.COMPLETE, -1: TrialState.FAIL}

    result = run_sweep(tmp_path, *grid, name="resumed", search="hydra/sweeper=lora_lab_optuna")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-4000:]
    trials = load_study(tmp_path).trials
    assert [(t.number, t.params["train.lr"], t.state) for t in trials[2:]] == [(2, -1.0, TrialState.FAIL)]
    assert "no trial of this sweep completed: 1 ran, 1 FAIL" in out


def test_two_sweeps_started_at_once_in_one_dir_never_share_it(tmp_path):
    """The second sweep to claim the dir is refused before it writes anything there; the first's
    trial dir, metrics and summary are its own."""
    sweeps = [
        start_cli(
            [
                "-m",
                "lora_lab.train",
                "-m",
                "hparams_search=lora",
                f"hydra.sweep.dir={tmp_path}/shared",
                f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna{i}.db",
                "hydra.sweeper.study_name=study",
                "hydra.sweeper.n_trials=1",
                *SWEEP_FAST,
            ],
            tmp_path,
            tmp_path / f"sweep{i}.log",
        )
        for i in range(2)
    ]
    for s in sweeps:
        s.wait(timeout=600)
    outputs = [s.output() for s in sweeps]
    codes = [s.returncode for s in sweeps]
    assert sorted(codes) == [0, 2], outputs
    winner, loser = codes.index(0), codes.index(2)
    assert f"hydra.sweep.dir='{tmp_path}/shared' is invalid" in outputs[loser]
    summary = yaml.safe_load((tmp_path / "shared" / "study_summary.yaml").read_text())
    assert summary["storage"] == f"sqlite:///{tmp_path}/optuna{winner}.db"
    assert sorted(p.name for p in (tmp_path / "shared").iterdir() if p.name.isdigit()) == ["0"]
    assert len(optuna.load_study(study_name="study", storage=summary["storage"]).trials) == 1


def test_runs_and_sweeps_started_in_the_same_second_get_their_own_dirs():
    from hydra import compose, initialize_config_dir

    import lora_lab.config  # noqa: F401  registers the schema the root config builds on

    with initialize_config_dir(config_dir=str(CONF_DIR)):
        first, second = (compose(config_name="train", return_hydra_config=True) for _ in range(2))
        assert first.hydra.run.dir != second.hydra.run.dir
        assert first.hydra.sweep.dir != second.hydra.sweep.dir


IDENTITY = {"optimized_metric": "eval/loss", "hydra.sweeper.direction": "minimize", "train.max_steps": "10"}


def _check_identity_at_once(barrier, storage: str, identity: dict) -> None:
    from hydra_plugins.lora_lab_sweeper._identity import check_identity
    from hydra_plugins.lora_lab_sweeper._storage import create_or_load_study

    barrier.wait()
    study = create_or_load_study(study_name="shared", storage=storage, directions=["minimize"])
    check_identity(study, identity)


def test_workers_starting_one_study_together_all_pass_its_identity_check(postgres_url):
    """Workers that start one study at once each find no identity yet and write theirs: all of them
    must go on; a worker with other settings is refused afterwards."""
    import psycopg

    from hydra_plugins.lora_lab_sweeper._identity import IDENTITY_ATTR, check_identity
    from lora_lab.errors import ConfigError

    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE DATABASE identity_race")
    storage = postgres_url.rsplit("/", 1)[0] + "/identity_race"
    barrier = context.Barrier(8)
    workers = [
        context.Process(target=_check_identity_at_once, args=(barrier, storage, IDENTITY)) for _ in range(8)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 8
    study = optuna.load_study(study_name="shared", storage=storage)
    assert study.user_attrs[IDENTITY_ATTR] == IDENTITY
    with pytest.raises(ConfigError, match=r"train\.max_steps: 11 here, 10 in the study"):
        check_identity(study, {**IDENTITY, "train.max_steps": "11"})


def test_successive_halving_preset_stops_trials_at_their_first_rung(tmp_path):
    sweep_dir = sweep(tmp_path, "hydra.sweeper.n_trials=4", search="hparams_search=lora_asha")
    study = load_study(tmp_path)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and study.trials[0].state == TrialState.COMPLETE
    for trial in pruned:  # stopped at the first rung (min_resource = train.eval_steps = 5) of 10 steps
        assert max(trial.intermediate_values) == 5
        earlier = [t.intermediate_values[5] for t in study.trials if t.number < trial.number]
        assert trial.intermediate_values[5] < max(earlier)  # not the best at that rung: token accuracy
    report = cli(["-m", "lora_lab.report", str(sweep_dir)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    rows = list(csv.DictReader((sweep_dir / "report.csv").read_text().splitlines()))
    assert [r["pruned at step"] for r in rows if r["state"] == "PRUNED"] == ["5"] * len(pruned)


HYDRA_APP = """import hydra


@hydra.main(version_base=None, config_path=".", config_name="config")
def main(cfg) -> float:
    return (cfg.x - 1) ** 2 + cfg.y**2


if __name__ == "__main__":
    main()
"""


def test_the_sweeper_serves_any_hydra_app_as_the_stock_one_does(tmp_path):
    """An app without lora_lab's keys (optimized_metric, train.seed): its study is identified by its
    directions and overrides, its best command reruns the app itself, and lora_lab's extras that need
    train.seed (repeats, the winner's interval) are left out or refused in one line."""
    (tmp_path / "app.py").write_text(HYDRA_APP)
    (tmp_path / "config.yaml").write_text("x: 0\ny: 0\n")
    grid = [
        "-m",
        "hydra/sweeper=lora_lab_optuna",
        "hydra/sweeper/sampler=grid",
        "x=range(-1,2)",
        "y=range(-1,2)",
    ]
    result = cli(["app.py", *grid, f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path, fresh=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = yaml.safe_load((tmp_path / "s" / "study_summary.yaml").read_text())
    assert summary["trial_states"]["COMPLETE"] == 9 and summary["best_value"] == 0.0
    assert summary["best_command"] == "python app.py x=1 y=0" and "winner" not in summary
    study = optuna.load_study(study_name="app", storage=f"sqlite:///{tmp_path / 's' / 'optuna.db'}")
    assert "optimized_metric" not in study.user_attrs["sweep_identity"]

    repeated = cli(
        ["app.py", *grid, "hydra.sweeper.seeds=2", f"hydra.sweep.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
        fresh=True,
    )
    output = repeated.stdout + repeated.stderr
    assert repeated.returncode != 0 and "Traceback" not in output
    assert "hydra.sweeper.seeds=2 is invalid: 1 for an app without a train.seed key" in output
