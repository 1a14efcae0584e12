"""`python -m lora_lab.report` on real sweeps and runs of the tiny model: every number in the report is
checked against the Optuna storage (objectives) and the jobs' metrics.json (measurements)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import SWEEP_FAST, cli
from optuna.trial import TrialState
from PIL import Image


def run(args: list[str], cwd: Path) -> None:
    result = cli(["-m", "lora_lab.train", *args, *SWEEP_FAST], cwd=cwd)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def optuna_sweep(tmp_path: Path, *overrides: str) -> Path:
    sweep_dir = tmp_path / "sweep"
    run(
        [
            "-m",
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
            "hydra.sweeper.study_name=study",
            *overrides,
        ],
        tmp_path,
    )
    return sweep_dir


def load_study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="study", storage=f"sqlite:///{sweep_dir.parent}/optuna.db")


def job_metrics(sweep_dir: Path) -> dict[int, dict]:
    """metrics.json of each job that wrote one, by the Optuna trial number the sweeper gave it."""
    found = {}
    for overrides in sweep_dir.glob("*/.hydra/overrides.yaml"):
        job = overrides.parent.parent
        number = next(
            o for o in yaml.safe_load(overrides.read_text()) if o.startswith("++optuna_trial.number=")
        )
        if (job / "metrics.json").exists():
            found[int(number.split("=")[1])] = json.loads((job / "metrics.json").read_text())
    return found


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path
    with Image.open(path) as image:
        assert image.width >= 500 and image.height >= 300, (path, image.size)


def assert_efficiency_matches(out_dir: Path, metrics_by_rank: dict[int, dict]) -> None:
    """The meta-device count per rank equals what the real training run counted."""
    table = {int(row["r"]): row for row in read_csv(out_dir / "param_efficiency.csv")}
    assert {1, 2, 4, 8, 16, 32, 64} <= set(table)
    for r, metrics in metrics_by_rank.items():
        assert int(table[r]["trainable"]) == metrics["params/trainable"]
        assert int(table[r]["base params"]) == metrics["params/total"] - metrics["params/trainable"]
        assert float(table[r]["reduction"]) == int(table[r]["base params"]) / metrics["params/trainable"]


def report_in_process(capsys, *args: str) -> tuple[int, str, str]:
    from lora_lab.report import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pruned_and_failed_sweep(tmp_path_factory) -> Path:
    """A grid of 6 trials: lr=-1 fails validation (FAIL), lr=1e-6 leaves the loss above the threshold at
    step 5 (PRUNED: ~7.08, the untrained loss), lr=3e-3 completes (its step-5 loss is ~4.5 to ~5.9)."""
    return optuna_sweep(
        tmp_path_factory.mktemp("pruned"),
        "hydra/sweeper=lora_lab_optuna",
        "hydra/sweeper/sampler=grid",
        "optimized_metric=eval/loss",
        "hydra.sweeper.direction=minimize",
        "+hydra.sweeper.params={adapter.r: 'choice(4, 16)', train.lr: 'choice(0.003, 1e-6, -1.0)'}",
        "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, upper: 7.0, n_warmup_steps: 1}",
    )


@pytest.mark.slow
def test_sweep_report_matches_storage_and_metrics(pruned_and_failed_sweep):
    sweep_dir = pruned_and_failed_sweep
    result = cli(["-m", "lora_lab.report", str(sweep_dir)], cwd=sweep_dir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert str(sweep_dir / "report.md") in result.stdout and "| trial | state |" in result.stdout

    study, metrics = load_study(sweep_dir), job_metrics(sweep_dir)
    rows = {int(row["trial"]): row for row in read_csv(sweep_dir / "report.csv")}
    assert sorted(rows) == [t.number for t in study.trials] and len(rows) == 6
    expected = {0.003: TrialState.COMPLETE, 1e-6: TrialState.PRUNED, -1.0: TrialState.FAIL}
    for trial in study.trials:
        row = rows[trial.number]
        assert row["state"] == trial.state.name == expected[trial.params["train.lr"]].name
        assert (int(row["adapter.r"]), float(row["train.lr"])) == (
            trial.params["adapter.r"],
            trial.params["train.lr"],
        )
        if trial.state == TrialState.COMPLETE:
            assert float(row["eval/loss"]) == trial.value  # exactly, not approximately
            job = metrics[trial.number]
            assert int(row["params/trainable"]) == job["params/trainable"]
            for key in ("memory/peak_gib", "speed/tokens_per_second", "time/wall_seconds"):
                assert float(row[key]) == job[key]
            assert row["fail reason"] == ""
        elif trial.state == TrialState.PRUNED:
            assert float(row["eval/loss"]) == trial.value and row["pruned at step"] == "5"
            assert row["params/trainable"] == ""  # a pruned job writes no metrics.json
        else:
            assert row["eval/loss"] == "" and row["fail reason"] == trial.user_attrs["fail_reason"]
            assert "train.lr=-1.0" in row["fail reason"]

    markdown = (sweep_dir / "report.md").read_text()
    assert all(f"2 {state}" in markdown for state in ("COMPLETE", "PRUNED", "FAIL"))
    for png in ("objective_vs_rank", "objective_vs_lr", "param_importances"):
        assert_png(sweep_dir / f"{png}.png")
        assert f"]({png}.png)" in markdown
    assert not (sweep_dir / "alpha_rank_heatmap.png").exists()  # no alpha param in this study
    assert not (sweep_dir / "pareto_front.png").exists()  # one objective
    by_rank = {study.trials[n].params["adapter.r"]: m for n, m in metrics.items()}
    assert set(by_rank) == {4, 16}
    assert_efficiency_matches(sweep_dir, by_rank)


@pytest.mark.slow
def test_report_from_the_storage_url_alone(pruned_and_failed_sweep, tmp_path, capsys):
    storage = f"sqlite:///{pruned_and_failed_sweep.parent}/optuna.db"
    code, out, err = report_in_process(capsys, storage, "--study", "study", "--out", tmp_path)
    assert code == 0, err
    rows = read_csv(tmp_path / "report.csv")
    study = load_study(pruned_and_failed_sweep)
    assert [(int(r["trial"]), r["state"]) for r in rows] == [(t.number, t.state.name) for t in study.trials]
    # No job config names the objective or the model: numbered objective, no efficiency table.
    assert [float(r["objective"]) for r in rows if r["state"] == "COMPLETE"] == [
        t.value for t in study.trials if t.state == TrialState.COMPLETE
    ]
    assert "Skipped" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "param_efficiency.csv").exists()


@pytest.mark.slow
def test_multi_objective_report_draws_the_pareto_front(tmp_path, capsys):
    sweep_dir = optuna_sweep(
        tmp_path,
        "hparams_search=lora",
        "hydra.sweeper.n_trials=3",
        "optimized_metric=[eval/token_accuracy,params/trainable]",
        "hydra.sweeper.direction=[maximize,minimize]",
    )
    code, out, err = report_in_process(capsys, sweep_dir)
    assert code == 0, err
    study = load_study(sweep_dir)
    rows = {int(row["trial"]): row for row in read_csv(sweep_dir / "report.csv")}
    for trial in study.trials:
        row = rows[trial.number]
        assert row["state"] == "COMPLETE"
        assert [float(row["eval/token_accuracy"]), float(row["params/trainable"])] == trial.values
        assert float(row["adapter.alpha_multiple"]) == trial.params["adapter.alpha_multiple"]
    for png in (
        "objective_vs_rank",
        "objective_vs_lr",
        "alpha_rank_heatmap",
        "param_importances",
        "pareto_front",
    ):
        assert_png(sweep_dir / f"{png}.png")


@pytest.mark.slow
def test_plain_hydra_multirun_is_reported_from_its_job_dirs(tmp_path, capsys):
    sweep_dir = tmp_path / "grid"
    run(["-m", "adapter.r=4,8", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    code, out, err = report_in_process(capsys, sweep_dir)
    assert code == 0, err
    rows = read_csv(sweep_dir / "report.csv")
    assert [r["adapter.r"] for r in rows] == ["4", "8"]  # the swept override; the fixed ones are not params
    assert "train.max_steps" not in rows[0]
    by_rank = {}
    for row, job in zip(rows, ("0", "1"), strict=True):
        metrics = json.loads((sweep_dir / job / "metrics.json").read_text())
        assert row["state"] == "COMPLETE"
        assert float(row["eval/token_accuracy"]) == metrics["eval/token_accuracy"]
        assert int(row["params/trainable"]) == metrics["params/trainable"]
        by_rank[int(row["adapter.r"])] = metrics
    assert_png(sweep_dir / "objective_vs_rank.png")
    assert not (sweep_dir / "param_importances.png").exists()  # importances need an Optuna study
    assert_efficiency_matches(sweep_dir, by_rank)


def test_single_run_gives_a_one_row_report(tmp_path, capsys):
    run_dir = tmp_path / "outputs" / "run"
    run([f"hydra.run.dir={run_dir}", "adapter.r=2", "adapter.target_modules=qv"], tmp_path)
    code, out, err = report_in_process(capsys, run_dir)
    assert code == 0, err
    assert out.splitlines()[0] == str(run_dir / "report.md")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    [row] = read_csv(run_dir / "report.csv")
    assert row["state"] == "COMPLETE" and row["adapter.r"] == "2"
    assert float(row["eval/token_accuracy"]) == metrics["eval/token_accuracy"]
    assert int(row["params/trainable"]) == metrics["params/trainable"]
    assert {r["target_modules"] for r in read_csv(run_dir / "param_efficiency.csv")} == {"qv"}
    assert_efficiency_matches(run_dir, {2: metrics})


def test_missing_path_is_one_clear_line(tmp_path):
    result = cli(["-m", "lora_lab.report", str(tmp_path / "nope")], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert str(tmp_path / "nope") in line and "sweep dir" in line and "sqlite:///" in line


def test_bad_arguments_are_refused_clearly(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/two.db"
    for name in ("alpha", "beta"):
        optuna.create_study(study_name=name, storage=storage)
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "empty"], ["empty", "no runs", "run dir"]),
        ([storage, "--study", "gamma"], ["--study=gamma", "alpha, beta"]),
        ([storage], ["--study is required", "alpha, beta"]),
        ([f"sqlite:///{tmp_path}/missing.db"], ["missing.db", "no such SQLite file"]),
    ]
    for args, words in cases:
        code, out, err = report_in_process(capsys, *args)
        assert code == 2 and out == "", (args, out)
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), (args, err)
    assert not (tmp_path / "missing.db").exists()  # not created by asking
