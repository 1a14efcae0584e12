"""`python -m lora_lab.report` on real sweeps and runs of the tiny model: every number in the report is
checked against the Optuna storage (objectives), the jobs' metrics.json (measurements), and the means,
t-intervals and Welch intervals computed here from the formulas with scipy's t quantiles."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import SWEEP_FAST, cli
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image
from scipy import stats as scipy_stats

# The module fixture is one costly run: its tests go to one xdist worker (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("report_sweep")

CONFIRM = "python -m lora_lab.confirm {} --top 3 --seeds 5"


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
        # one trainable share, of all parameters, in the report, metrics.json and the training log
        assert float(table[r]["trainable %"]) == pytest.approx(metrics["params/trainable_pct"], rel=1e-12)


def mean_and_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def t_interval(values: list[float]) -> tuple[float, float]:
    """The 95% Student-t interval of the mean, from its formula."""
    mean, std = mean_and_std(values)
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
    return mean - half, mean + half


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """The 95% Welch interval of mean(a) - mean(b): Welch-Satterthwaite degrees of freedom."""
    (mean_a, std_a), (mean_b, std_b) = mean_and_std(a), mean_and_std(b)
    va, vb = std_a**2 / len(a), std_b**2 / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    return mean_a - mean_b - half, mean_a - mean_b + half


def pooled_student_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """The equal-variance interval a Welch implementation must not give."""
    (mean_a, std_a), (mean_b, std_b) = mean_and_std(a), mean_and_std(b)
    df = len(a) + len(b) - 2
    pooled = ((len(a) - 1) * std_a**2 + (len(b) - 1) * std_b**2) / df
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(pooled * (1 / len(a) + 1 / len(b)))
    return mean_a - mean_b - half, mean_a - mean_b + half


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
    for png in ("objective_vs_rank", "objective_vs_lr"):
        assert_png(sweep_dir / f"{png}.png")
        assert f"]({png}.png)" in markdown
    # Only the rank varies among the completed trials (all lr=3e-3): it would get importance 1 regardless.
    assert not (sweep_dir / "param_importances.png").exists()
    assert "Skipped: param importances: only adapter.r varies" in markdown
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
    # One seed per rank: no interval, and the command that repeats them.
    assert [(r["config"], r["verdict"], r["ci_low"]) for r in read_csv(sweep_dir / "comparison.csv")] == [
        (f"adapter.r={r}", "unconfirmed", "")
        for r in sorted(by_rank, key=lambda r: -by_rank[r]["eval/token_accuracy"])
    ]
    assert CONFIRM.format(sweep_dir) in out
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
    [compared] = read_csv(run_dir / "comparison.csv")
    assert (compared["n"], compared["verdict"]) == ("1", "unconfirmed")
    assert float(compared["mean"]) == metrics["eval/token_accuracy"]
    assert "One configuration only" in (run_dir / "comparison.md").read_text()


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


def assert_comparison_row(row: dict, values: list[float], best: list[float] | None) -> None:
    """A comparison.csv row against the mean, t-interval and Welch interval computed from its runs."""
    mean, std = mean_and_std(values)
    assert int(row["n"]) == len(values)
    assert float(row["mean"]) == pytest.approx(mean, rel=1e-12)
    assert float(row["std"]) == pytest.approx(std, rel=1e-12)
    assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx(t_interval(values), rel=1e-12)
    if best is None:
        assert float(row["diff_vs_best"]) == 0 and row["verdict"] == "best"
        assert row["diff_ci_low"] == row["diff_ci_high"] == ""
        return
    low, high = welch_interval(values, best)
    assert float(row["diff_vs_best"]) == pytest.approx(mean - mean_and_std(best)[0], rel=1e-12)
    assert (float(row["diff_ci_low"]), float(row["diff_ci_high"])) == pytest.approx((low, high), rel=1e-12)
    assert row["verdict"] == ("worse" if low > 0 or high < 0 else "within noise")


def as_csv(row: dict) -> dict:
    """A compare() row as comparison.csv writes it: no interval is a blank."""
    return {k: "" if isinstance(v, float) and math.isnan(v) else str(v) for k, v in row.items()}


def test_verdicts_follow_the_welch_interval_and_the_direction():
    from lora_lab.stats import compare, noise_floor

    apart = {"a": [0.80, 0.82, 0.81], "b": [0.60, 0.65, 0.58, 0.62, 0.61]}
    # Unequal sizes and spreads: a pooled-variance interval is another interval.
    assert welch_interval(apart["b"], apart["a"]) != pytest.approx(
        pooled_student_interval(apart["b"], apart["a"])
    )
    rows = [as_csv(r) for r in compare(apart, "maximize")]
    assert [r["config"] for r in rows] == ["a", "b"]
    assert_comparison_row(rows[0], apart["a"], None)
    assert_comparison_row(rows[1], apart["b"], apart["a"])
    assert rows[1]["verdict"] == "worse"
    # Lower is better now: b is best and a is worse by a positive difference.
    rows = [as_csv(r) for r in compare(apart, "minimize")]
    assert [(r["config"], r["verdict"]) for r in rows] == [("b", "best"), ("a", "worse")]
    assert_comparison_row(rows[1], apart["a"], apart["b"])
    assert float(rows[1]["diff_ci_low"]) > 0

    overlapping = {"a": [0.80, 0.70, 0.90], "b": [0.78, 0.66, 0.86]}
    rows = [as_csv(r) for r in compare(overlapping, "maximize")]
    assert [(r["config"], r["verdict"]) for r in rows] == [("a", "best"), ("b", "within noise")]
    assert_comparison_row(rows[1], overlapping["b"], overlapping["a"])

    # A single run has no interval: it and whatever is compared with it are unconfirmed.
    rows = compare({"a": [0.80, 0.82, 0.81], "b": [0.5]}, "maximize")
    assert [r["verdict"] for r in rows] == ["best", "unconfirmed"]
    assert math.isnan(rows[1]["ci_low"]) and math.isnan(rows[1]["diff_ci_low"]) and rows[1]["n"] == 1
    rows = compare({"a": [0.9], "b": [0.5, 0.52]}, "maximize")
    assert [(r["config"], r["verdict"]) for r in rows] == [("a", "unconfirmed"), ("b", "unconfirmed")]
    [row] = compare({"a": [0.80, 0.82]}, "maximize")  # nothing to compare with
    assert row["verdict"] == "unconfirmed" and (row["ci_low"], row["ci_high"]) == pytest.approx(
        t_interval([0.8, 0.82])
    )

    floor, df = noise_floor([apart["a"], apart["b"], [0.5]])
    squares = sum((v - mean_and_std(s)[0]) ** 2 for s in (apart["a"], apart["b"]) for v in s)
    assert df == 6 and floor == pytest.approx(math.sqrt(squares / 6), rel=1e-12)
    assert noise_floor([[0.5], [0.6]]) == (pytest.approx(math.nan, nan_ok=True), 0)


def grid_storage(tmp_path: Path, direction: str, values: dict[tuple, float], names: tuple[str, ...]) -> str:
    """A real Optuna storage holding the completed trials a grid study of these params would hold."""
    storage = f"sqlite:///{tmp_path}/grid.db"
    study = optuna.create_study(study_name="grid", storage=storage, direction=direction)
    space = {n: CategoricalDistribution(sorted({key[i] for key in values})) for i, n in enumerate(names)}
    for key, value in values.items():
        study.add_trial(
            create_trial(params=dict(zip(names, key, strict=True)), distributions=space, value=value)
        )
    return storage


def test_optuna_grid_with_seeds_as_trial_params_is_compared_per_configuration(tmp_path, capsys):
    losses = {"none": [1.00, 1.03, 1.01], "nf4": [1.10, 1.16, 1.09]}
    values = {(q, seed): v for q, runs in losses.items() for seed, v in enumerate(runs)}
    storage = grid_storage(tmp_path, "minimize", values, ("quant", "train.seed"))
    code, out, err = report_in_process(capsys, storage, "--out", tmp_path)
    assert code == 0, err
    rows = read_csv(tmp_path / "comparison.csv")
    assert list(rows[0]) == [
        "config",
        "n",
        "mean",
        "std",
        "ci_low",
        "ci_high",
        "diff_vs_best",
        "diff_ci_low",
        "diff_ci_high",
        "verdict",
    ]
    assert [r["config"] for r in rows] == ["quant=none", "quant=nf4"]  # lower loss first
    assert_comparison_row(rows[0], losses["none"], None)
    assert_comparison_row(rows[1], losses["nf4"], losses["none"])
    assert rows[1]["verdict"] == "worse"
    floor = math.sqrt((mean_and_std(losses["none"])[1] ** 2 + mean_and_std(losses["nf4"])[1] ** 2) / 2)
    markdown = (tmp_path / "comparison.md").read_text()
    assert f"4 degrees of freedom): {floor:.4g}." in markdown
    assert "unconfirmed" not in markdown and "lora_lab.confirm" not in out
    assert_png(tmp_path / "objective_memory_by_quant.png")
    assert "](objective_memory_by_quant.png)" in (tmp_path / "report.md").read_text()


def test_one_param_study_without_repeats_is_unconfirmed_and_has_no_importance_plot(tmp_path, capsys):
    storage = grid_storage(tmp_path, "maximize", {(4,): 0.61, (8,): 0.64, (16,): 0.60}, ("adapter.r",))
    code, out, err = report_in_process(capsys, storage, "--out", tmp_path)
    assert code == 0, err
    rows = read_csv(tmp_path / "comparison.csv")
    assert [(r["config"], r["n"], r["verdict"]) for r in rows] == [
        ("adapter.r=8", "1", "unconfirmed"),
        ("adapter.r=4", "1", "unconfirmed"),
        ("adapter.r=16", "1", "unconfirmed"),
    ]
    assert all(r[k] == "" for r in rows for k in ("std", "ci_low", "ci_high", "diff_ci_low", "diff_ci_high"))
    assert [float(r["diff_vs_best"]) for r in rows] == pytest.approx([0, 0.61 - 0.64, 0.60 - 0.64])
    assert CONFIRM.format("<sweep dir>") in out  # a storage URL names no sweep dir
    markdown = (tmp_path / "report.md").read_text()
    assert "noise floor) is unknown" in markdown and "every difference here is unconfirmed" in markdown
    assert not (tmp_path / "param_importances.png").exists()
    assert "Skipped: param importances: only adapter.r varies" in markdown
    assert_png(tmp_path / "objective_vs_rank.png")


@pytest.mark.slow
def test_seed_grid_comparison_matches_the_runs(tmp_path, capsys):
    """2 configurations x 3 seeds, a plain Hydra multirun: comparison.csv against the runs' metrics.json."""
    sweep_dir = tmp_path / "grid"
    run(
        [
            "-m",
            "quant=none,nf4",
            "train.seed=range(3)",
            "train.eval_on_start=false",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
    )
    code, out, err = report_in_process(capsys, sweep_dir)
    assert code == 0, err
    accuracy: dict[str, list[float]] = {}
    for job in sorted(sweep_dir.glob("[0-9]*")):
        quant = next(
            o for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text()) if o.startswith("quant=")
        )
        accuracy.setdefault(quant, []).append(
            json.loads((job / "metrics.json").read_text())["eval/token_accuracy"]
        )
    assert sorted(map(len, accuracy.values())) == [3, 3]
    best, other = sorted(accuracy, key=lambda q: -mean_and_std(accuracy[q])[0])  # higher accuracy is better
    rows = read_csv(sweep_dir / "comparison.csv")
    assert [r["config"] for r in rows] == [best, other]
    assert_comparison_row(rows[0], accuracy[best], None)
    assert_comparison_row(rows[1], accuracy[other], accuracy[best])
    floor = math.sqrt(sum(mean_and_std(v)[1] ** 2 for v in accuracy.values()) / 2)
    assert f"4 degrees of freedom): {floor:.4g}." in (sweep_dir / "comparison.md").read_text()
    assert "lora_lab.confirm" not in out
    assert_png(sweep_dir / "objective_memory_by_quant.png")


def test_a_storage_password_reaches_no_report_file_nor_message(postgres_url, tmp_path, capsys):
    storage = postgres_url.replace("postgres@", "postgres:report-s3cret@")  # the test server trusts any
    study = optuna.create_study(study_name="report_masked", storage=storage)
    space = {"adapter.r": CategoricalDistribution([4, 8])}
    for r, value in ((4, 1.0), (8, 1.2)):
        study.add_trial(create_trial(params={"adapter.r": r}, distributions=space, value=value))
    code, out, err = report_in_process(capsys, storage, "--study", "report_masked", "--out", tmp_path)
    assert code == 0, err
    assert "postgres:***@127.0.0.1" in (tmp_path / "report.md").read_text()
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and b"report-s3cret" in p.read_bytes()] == []
    assert "report-s3cret" not in out + err
    code, out, err = report_in_process(capsys, storage, "--study", "nope")
    assert code == 2 and "postgres:***@127.0.0.1" in err and "report-s3cret" not in err


def border_pixels(path: Path) -> set:
    """The colours of a PNG's outermost 2 pixels all round: a text cut at an edge shows there."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        w, h = rgb.size
        edge = [(x, y) for x in range(w) for y in (0, 1, h - 2, h - 1)]
        edge += [(x, y) for y in range(h) for x in (0, 1, w - 2, w - 1)]
        return {rgb.getpixel(p) for p in edge}


@pytest.mark.slow
def test_a_seeds_axis_is_never_a_setting(tmp_path, capsys):
    """`train.seed=range(3)` searched beside the rank (the README's rank ablation with seeds): the best
    configuration, its command, optimization_results.yaml and the importances leave the seed out, and
    the best is the configuration of the best mean, computed here from the study."""
    sweep_dir = optuna_sweep(
        tmp_path,
        "experiment=rank_ablation",
        "adapter.r=choice(4,16)",
        "train.seed=range(3)",
        "train.eval_on_start=false",
        "train.max_steps=6",
    )
    study = load_study(sweep_dir)
    assert len(study.trials) == 6
    by_rank: dict[int, list[float]] = {}
    for t in study.trials:
        by_rank.setdefault(t.params["adapter.r"], []).append(t.value)
    best = max(by_rank, key=lambda r: sum(by_rank[r]) / 3)  # token accuracy: higher is better
    summary = yaml.safe_load((sweep_dir / "study_summary.yaml").read_text())
    assert summary["best_configuration"]["params"] == {"adapter.r": best}
    assert summary["best_configuration"]["mean"] == pytest.approx(sum(by_rank[best]) / 3, rel=1e-12)
    assert summary["best_configuration"]["runs"] == 3
    assert f"adapter.r={best}" in summary["best_command"] and "train.seed" not in summary["best_command"]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"adapter.r": best}
    assert results["best_value"] == pytest.approx(sum(by_rank[best]) / 3, rel=1e-12)

    code, out, err = report_in_process(capsys, sweep_dir)
    assert code == 0, err
    # Over the configurations' means only the rank varies: the seed gets no importance at all.
    assert "Skipped: param importances: only adapter.r varies" in (sweep_dir / "report.md").read_text()
    [row] = [r for r in read_csv(sweep_dir / "comparison.csv") if r["config"] == f"adapter.r={best}"]
    assert int(row["n"]) == 3


@pytest.mark.slow
def test_every_plot_of_a_sweep_keeps_its_text_inside_the_canvas(tmp_path, capsys):
    """Every plot a sweep can have (rank, lr, the alpha x rank heatmap, quantization, importances, the
    Pareto front), under a long study name: no text reaches an edge, read from the PNG's border
    pixels, which stay the background's white."""
    name = "a_study_name_as_long_as_the_ones_experiments_compose_from_model_and_task"
    sweep_dir = optuna_sweep(
        tmp_path,
        "hparams_search=lora",
        "hydra.sweeper.n_trials=5",
        f"hydra.sweeper.study_name={name}",
        "quant=choice(none,nf4)",
        "optimized_metric=[eval/token_accuracy,params/trainable]",
        "hydra.sweeper.direction=[maximize,minimize]",
        "train.eval_on_start=false",
        "train.max_steps=6",
    )
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len({t.params["quant"] for t in study.trials}) == 2, "the sampler drew one quant only"
    code, out, err = report_in_process(capsys, sweep_dir)
    assert code == 0, err
    plots = sorted(sweep_dir.glob("*.png"))
    assert {p.stem for p in plots} == {
        "objective_vs_rank",
        "objective_vs_lr",
        "alpha_rank_heatmap",
        "objective_memory_by_quant",
        "param_importances",
        "pareto_front",
    }
    for png in plots:
        assert border_pixels(png) == {(255, 255, 255)}, png.name


def test_a_heatmap_cell_draws_an_interval_only_over_one_configurations_seeds():
    from lora_lab import stats
    from lora_lab.report.plots import cell_text

    seeds = [0.70, 0.74, 0.72]  # one configuration, three seeds: its mean and t-interval
    low, high = t_interval(seeds)
    assert cell_text([stats.summarize(seeds)]) == f"{0.72:.4g} ± {(high - low) / 2:.2g}\nn=3"
    assert cell_text([stats.summarize([0.7])]) == "0.7\nn=1"
    # Two learning rates in one (alpha, rank) cell: their values, no interval, n of settings.
    assert cell_text([stats.summarize([0.718]), stats.summarize([0.731])]) == "0.718, 0.731\n2 settings"
    spread = [stats.summarize([v]) for v in (0.61, 0.7, 0.64, 0.66)]
    assert cell_text(spread) == "0.61 .. 0.7\n4 settings"
