"""Seeds in searches (hydra.sweeper.seeds), the study summary's rerun commands and confirmed winner, and
`python -m lora_lab.confirm`: real sweeps of the tiny model, every number checked against the jobs'
metrics.json, the Optuna storage and scipy."""

from __future__ import annotations

import csv
import json
import shlex
import statistics
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import SWEEP_FAST, cli, compose, load_study, sweep_output
from omegaconf import OmegaConf
from optuna.trial import TrialState
from scipy import stats as scipy_stats

pytestmark = pytest.mark.slow
# A trial here: SWEEP_FAST at 6 steps, one evaluation at the end.
TINY = ["train.max_steps=6", "train.eval_steps=6", "train.eval_on_start=false"]
OBJECTIVE = "eval/token_accuracy"


def sweep(tmp_path: Path, *overrides: str) -> tuple[Path, str]:
    """A finished hparams_search=lora sweep in tmp_path/s (study `study`): its dir and its output."""
    return tmp_path / "s", sweep_output(tmp_path, *TINY, *overrides)


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def saved_config(job: Path) -> dict:
    """A job's config as it ran, less the sweeper's bookkeeping and the seed."""
    cfg = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml"))
    cfg.pop("optuna_trial")
    cfg["train"].pop("seed")
    return cfg


def summary_and_lines(sweep_dir: Path) -> tuple[dict, list[str]]:
    text = (sweep_dir / "study_summary.yaml").read_text()
    return yaml.safe_load(text), text.splitlines()


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# Seeds that agree (a configuration's runs equal) make scipy warn; its interval is still the right one.
@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")
def test_seeds_run_each_trial_n_times_and_the_summary_names_a_confirmed_winner(tmp_path, capsys):
    sweep_dir, output = sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.seeds=2", "train.seed=7")
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [
        "0_seed7",
        "0_seed8",
        "1_seed7",
        "1_seed8",
    ]
    values = {}
    for trial in study.trials:
        jobs = [sweep_dir / f"{trial.number}_seed{s}" for s in (7, 8)]
        assert [OmegaConf.load(j / ".hydra/config.yaml").train.seed for j in jobs] == [7, 8]
        assert saved_config(jobs[0]) == saved_config(jobs[1])  # the same configuration, seed aside
        runs = [metrics(j) for j in jobs]
        values[trial.number] = [m[OBJECTIVE] for m in runs]
        assert trial.value == pytest.approx(statistics.fmean(values[trial.number]), rel=1e-12)
        assert trial.user_attrs["seeds"] == [7, 8]
        assert trial.user_attrs["seed_values"] == {OBJECTIVE: pytest.approx(values[trial.number], rel=1e-12)}
        assert trial.user_attrs["seed_std"][OBJECTIVE] == pytest.approx(
            statistics.stdev(values[trial.number]), rel=1e-12
        )
        # The measurements, the mean of the two jobs', stored on the trial.
        for key in (
            "memory/peak_gib",
            "speed/tokens_per_second",
            "time/wall_seconds",
            "train/tokens",
            OBJECTIVE,
        ):
            assert trial.user_attrs["metrics"][key] == pytest.approx(statistics.fmean(m[key] for m in runs))
        assert trial.user_attrs["job_dirs"] == [str(j) for j in jobs]
    # A mean of two seeds, not one seed's value: on these runs the seeds disagree.
    assert any(len(set(v)) == 2 for v in values.values())

    # The confirmed-winner lines, against scipy's Welch interval of runner-up minus best.
    summary, lines = summary_and_lines(sweep_dir)
    best, runner_up = sorted(study.trials, key=lambda t: -t.value)
    low, high = scipy_stats.ttest_ind(
        values[runner_up.number], values[best.number], equal_var=False
    ).confidence_interval(0.95)
    winner = summary["winner"]
    assert (winner["best_n"], winner["runner_up_n"]) == (2, 2)
    assert winner["best_mean"] == pytest.approx(best.value, rel=1e-12)
    assert winner["runner_up_mean"] == pytest.approx(runner_up.value, rel=1e-12)
    assert winner["difference"] == pytest.approx(runner_up.value - best.value, rel=1e-12)
    assert (winner["difference_ci_low"], winner["difference_ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert winner["confirmed"] == (high < 0 or low > 0)
    assert winner["line"] in output and f"{low:.4g}, {high:.4g}]" in winner["line"]
    assert summary["best_trial"] == best.number

    # The report from the storage URL alone: measurements from the trials, each seed a run of its configuration.
    from lora_lab import report

    assert (
        report.main([f"sqlite:///{tmp_path}/optuna.db", "--study", "study", "--out", str(tmp_path / "r")])
        == 0
    )
    capsys.readouterr()
    rows = {int(r["trial"]): r for r in read_csv(tmp_path / "r" / "report.csv")}
    for trial in study.trials:
        assert float(rows[trial.number]["memory/peak_gib"]) == pytest.approx(
            trial.user_attrs["metrics"]["memory/peak_gib"]
        )
    compared = read_csv(tmp_path / "r" / "comparison.csv")
    assert sorted(int(r["n"]) for r in compared) == [2, 2]
    assert float(compared[1]["diff_ci_low"]) == pytest.approx(low, rel=1e-9)


def test_confirm_reruns_the_top_trials_with_fresh_seeds(tmp_path, capsys):
    sweep_dir, _ = sweep(tmp_path, "hydra.sweeper.n_trials=4")
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4

    # best_command: one YAML line, and it composes the best trial's config.
    summary, lines = summary_and_lines(sweep_dir)
    [line] = [ln for ln in lines if ln.startswith("best_command:")]
    assert yaml.safe_load(line)["best_command"] == summary["best_command"]
    words = shlex.split(summary["best_command"])
    assert words[:3] == ["python", "-m", "lora_lab.train"]
    best_job = sweep_dir / str(study.best_trial.number)
    rerun = OmegaConf.to_container(compose(words[3:]))
    rerun.pop("optuna_trial")
    rerun["train"].pop("seed")
    assert rerun == saved_config(best_job)
    # No repeats: the winner is unconfirmed, and the summary says how to confirm it.
    assert summary["winner"]["confirmed"] is None and summary["winner"]["runner_up_n"] == 1
    assert (
        f"confirm with: python -m lora_lab.confirm {sweep_dir} --top 3 --seeds 5" in summary["winner"]["line"]
    )

    result = cli(["-m", "lora_lab.confirm", str(sweep_dir), "--top", "2", "--seeds", "2"], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    top = sorted(study.trials, key=lambda t: -t.value)[:2]
    confirm_dir = sweep_dir / "confirm"
    # The study ran seed 42 (the default): the fresh seeds are 43 and 44.
    expected = sorted(f"trial{t.number}_seed{s}" for t in top for s in (43, 44))
    assert sorted(p.name for p in confirm_dir.iterdir() if p.is_dir()) == expected
    rows = {r["config"]: r for r in read_csv(confirm_dir / "comparison.csv")}
    assert len(rows) == 2
    for trial in top:
        jobs = [confirm_dir / f"trial{trial.number}_seed{s}" for s in (43, 44)]
        for job in jobs:  # the trial's configuration exactly, with the new seed
            assert saved_config(job) == saved_config(sweep_dir / str(trial.number))
        assert [OmegaConf.load(j / ".hydra/config.yaml").train.seed for j in jobs] == [43, 44]
        [row] = [r for label, r in rows.items() if f"train.lr={trial.params['train.lr']}" in label]
        assert int(row["n"]) == 2
        assert float(row["mean"]) == pytest.approx(
            statistics.fmean(metrics(j)[OBJECTIVE] for j in jobs), rel=1e-12
        )

    # Bad input: one line, exit 2 (in-process: the same main() the command runs).
    from lora_lab import confirm

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = optuna.create_study(study_name="failed", storage=f"sqlite:///{tmp_path}/failed.db")
    failed.tell(failed.ask(), state=TrialState.FAIL)
    for args, words in (
        ([str(empty)], ["no runs"]),
        ([str(sweep_dir), "--top", "0"], ["--top=0", ">= 1"]),
        ([str(sweep_dir), "--seeds", "1"], ["--seeds=1", ">= 2"]),
        ([f"sqlite:///{tmp_path}/failed.db", "--study-name", "failed"], ["COMPLETE", "has none"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            confirm.main(args)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, (args, err)
        assert all(w in err for w in words), (args, err)
    assert sorted(p.name for p in confirm_dir.iterdir() if p.is_dir()) == expected  # nothing more ran


def test_multi_objective_summary_has_a_rerun_command_per_pareto_trial(tmp_path):
    sweep_dir, output = sweep(
        tmp_path,
        "hydra.sweeper.n_trials=2",
        f"optimized_metric=[{OBJECTIVE},params/trainable]",
        "hydra.sweeper.direction=[maximize,minimize]",
    )
    study = load_study(tmp_path)
    summary, lines = summary_and_lines(sweep_dir)
    commands = summary["pareto_commands"]
    assert [c["trial"] for c in commands] == [t.number for t in study.best_trials]
    for entry, trial in zip(commands, study.best_trials, strict=True):
        assert entry["values"] == trial.values
        assert sum(ln.strip().startswith("command:") for ln in lines) == len(commands)  # one line each
        for name, value in trial.params.items():
            assert f"{name}={value}" in shlex.split(entry["command"])
        assert f"rerun Pareto-front trial {trial.number} with: {entry['command']}" in output


def test_confirm_reruns_a_plain_multiruns_best_configurations(tmp_path):
    """A plain Hydra multirun (no study): its configurations ranked on optimized_metric from the jobs'
    metrics.json, each rerun with seeds no job used; the confirm report numbers its runs in order and
    shows the params as the multirun wrote them (alpha_multiple 4, not the schema's 4.0)."""
    sweep_dir = tmp_path / "grid"
    grid = ["-m", "adapter.alpha_multiple=2,4", "train.seed=range(2)", f"hydra.sweep.dir={sweep_dir}"]
    result = cli(["-m", "lora_lab.train", *grid, *SWEEP_FAST, *TINY], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    first_job = {}
    for job in sorted(sweep_dir.glob("[0-9]*"), key=lambda j: int(j.name)):
        first_job.setdefault(OmegaConf.load(job / ".hydra/overrides.yaml")[0], int(job.name))

    result = cli(["-m", "lora_lab.confirm", str(sweep_dir), "--top", "2", "--seeds", "2"], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    confirm_dir = sweep_dir / "confirm"
    runs = {multiple: [confirm_dir / f"job{n}_seed{s}" for s in (2, 3)] for multiple, n in first_job.items()}
    assert sorted(p.name for p in confirm_dir.iterdir() if p.is_dir()) == sorted(
        p.name for jobs in runs.values() for p in jobs
    )  # seeds 0 and 1 ran in the multirun
    rows = {r["config"]: r for r in read_csv(confirm_dir / "comparison.csv")}
    assert set(rows) == {"adapter.alpha_multiple=2", "adapter.alpha_multiple=4"} == set(runs)
    for multiple, jobs in runs.items():
        assert int(rows[multiple]["n"]) == 2
        assert float(rows[multiple]["mean"]) == pytest.approx(
            statistics.fmean(metrics(j)[OBJECTIVE] for j in jobs)
        )
    trials = read_csv(confirm_dir / "report.csv")
    assert [r["trial"] for r in trials] == ["0", "1", "2", "3"]
    assert sorted((r["adapter.alpha_multiple"], r["train.seed"]) for r in trials) == [
        ("2", "2"),
        ("2", "3"),
        ("4", "2"),
        ("4", "3"),
    ]
