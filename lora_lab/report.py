"""Report of a sweep, a run or an Optuna study: every trial in a table, the configurations compared across
seeds, plots, LoRA's parameter efficiency.

python -m lora_lab.report multirun/2025-06-01/12-00-00    # a sweep dir (an Optuna study, or a plain grid)
python -m lora_lab.report outputs/2025-06-01/12-00-00     # a single run
python -m lora_lab.report sqlite:///multirun/optuna.db --study lora_tiny_sort --out reports/

Writes report.md, report.csv, comparison.md, comparison.csv, param_efficiency.csv and the plots that apply
to the study's params. Objective values come from the Optuna storage; measurements (memory, speed, time)
from metrics.json; means, intervals and differences from lora_lab.stats.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import sqlalchemy
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter
from omegaconf import DictConfig, OmegaConf
from optuna.importance import get_param_importances
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lora_lab import stats
from lora_lab.adapters import lora_config
from lora_lab.commands import CONFIRM
from lora_lab.config import RunConfig
from lora_lab.errors import ConfigError
from lora_lab.models import build_tiny_model
from lora_lab.validate import validate

RANKS = (1, 2, 4, 8, 16, 32, 64)
# metrics.json keys reported for every trial, and their Markdown headers (which name the unit).
MEASURES = {
    "params/trainable": "trainable params",
    "memory/peak_gib": "peak memory (GiB)",
    "speed/tokens_per_second": "tokens/s",
    "time/wall_seconds": "wall time (s)",
    "train/gradient_checkpointing": "checkpointing (1 = on)",  # auto may differ between trials
}
UNITS = {"eval/loss": "cross-entropy, nats", "eval/perplexity": "exp(loss)", "params/trainable": "count"}
UNITS |= {"memory/peak_gib": "GiB", "speed/tokens_per_second": "tokens/s", "time/wall_seconds": "s"}
PARAM_LABELS = {
    "adapter.r": "LoRA rank adapter.r (log2 scale)",
    "train.lr": "learning rate train.lr (log scale)",
    "adapter.alpha_multiple": "adapter.alpha_multiple (alpha / r)",
    "adapter.alpha": "LoRA alpha adapter.alpha",
}
STYLES = {"COMPLETE": {"marker": "o", "color": "tab:blue"}, "PRUNED": {"marker": "x", "color": "tab:orange"}}
PLOTS = (
    "objective_vs_rank",
    "objective_vs_lr",
    "alpha_rank_heatmap",
    "objective_memory_by_quant",
    "param_importances",
    "pareto_front",
)
SEED = "train.seed"  # runs that differ only in it are repeats of one configuration
QUANT_ORDER = ("none", "int8", "nf4", "fp4")  # most bits first
EFFICIENCY_COLUMNS = {"target_modules": "target modules", "layers": "layers", "r": "r"}
EFFICIENCY_COLUMNS |= {
    "trainable": "trainable params",
    "base params": "base params",
    "trainable %": "% of base",
    "reduction": "base/trainable",
}
RC = {"font.size": 11, "axes.titlesize": 12, "figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3}
VALID = (
    "give a run dir (with .hydra/), a sweep dir (with study_summary.yaml or job dirs 0/, 1/, ...) "
    "or an Optuna storage URL (sqlite:///path.db, postgresql://...) with --study"
)


class ReportError(Exception):
    """Bad command-line input: one line for the user, exit code 2."""


@dataclass
class Job:
    """A Hydra job dir: its saved config, its overrides, and metrics.json (None if it wrote none)."""

    path: Path
    cfg: DictConfig
    overrides: dict[str, Any]
    metrics: dict | None
    number: int  # the Optuna trial number the sweeper passed it, else the job dir's number


def load_job(path: Path) -> Job:
    cfg, overrides = OmegaConf.load(path / ".hydra/config.yaml"), {}
    for line in (
        OmegaConf.load(path / ".hydra/overrides.yaml") if (path / ".hydra/overrides.yaml").exists() else []
    ):
        key, _, raw = line.partition("=")
        key = key.lstrip("+~")
        if not key.startswith(("optuna_trial.", "hydra")):
            # The saved config holds the typed value; a group choice (quant=nf4) is a dict there.
            value = OmegaConf.select(cfg, key, default=None)
            overrides[key] = raw if value is None or OmegaConf.is_config(value) else value
    number = OmegaConf.select(cfg, "optuna_trial.number", default=None)
    if number is None:
        number = int(path.name) if path.name.isdigit() else 0
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else None
    return Job(path, cfg, overrides, metrics, number)


def without_password(text: str) -> str:
    """A storage URL (or a path) as the report writes and prints it: with any password masked."""
    try:
        return sqlalchemy.engine.make_url(text).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:  # a path, not a URL
        return text


def open_study(storage: str, name: str | None, arg: str) -> optuna.Study:
    # Optuna would create an empty database for a missing SQLite file.
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        raise ReportError(f"{arg}: no such SQLite file {storage.removeprefix('sqlite:///')}; {VALID}")
    arg, shown = without_password(arg), without_password(storage)
    try:
        names = optuna.get_all_study_names(storage)
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as e:
        raise ReportError(f"{arg}: cannot open Optuna storage {shown} ({str(e).splitlines()[0]})") from None
    if name is None and len(names) != 1:
        raise ReportError(f"--study is required: {shown} holds the studies {', '.join(names) or '(none)'}")
    if (name or names[0]) not in names:
        raise ReportError(f"--study={name}: no such study in {shown}; studies there: {', '.join(names)}")
    return optuna.load_study(study_name=name or names[0], storage=storage)


def load_source(target: str, study_name: str | None):
    """The job dirs, the Optuna study and its storage URL (None without one), and the default out dir."""
    if "://" in target:
        return [], open_study(target, study_name, target), target, Path.cwd()
    path = Path(target)
    if not path.is_dir():
        raise ReportError(f"{target}: no such directory; {VALID}")
    if (path / ".hydra" / "config.yaml").exists():
        return [load_job(path)], None, None, path
    jobs = sorted(
        (load_job(p) for p in path.iterdir() if (p / ".hydra" / "config.yaml").exists()),
        key=lambda j: j.number,
    )
    ref = OmegaConf.load(path / "study_summary.yaml") if (path / "study_summary.yaml").exists() else None
    if ref is None and jobs and OmegaConf.select(jobs[0].cfg, "optuna_trial.storage"):
        ref = jobs[0].cfg.optuna_trial  # an interrupted sweep wrote no summary, but its jobs name the study
    if ref is None and not jobs:
        raise ReportError(f"{target}: no runs in this directory; {VALID}")
    if ref is None:
        return jobs, None, None, path
    return jobs, open_study(ref.storage, study_name or ref.study_name, target), ref.storage, path


def objectives(jobs: list[Job], study: optuna.Study | None) -> tuple[list[str], list[str]]:
    """Objective names (from the jobs' optimized_metric: Optuna stores values only) and directions."""
    names = next((OmegaConf.select(j.cfg, "optimized_metric") for j in jobs), None)
    if names is not None:
        names = [names] if isinstance(names, str) else OmegaConf.to_container(names, resolve=True)
    else:
        n = len(study.directions)
        names = study.metric_names or (["objective"] if n == 1 else [f"objective {i}" for i in range(n)])
    if study is not None:
        return names, [d.name.lower() for d in study.directions]
    task_direction = OmegaConf.select(jobs[0].cfg, "task.metric_direction", default="minimize")
    # Without a study, directions only label the plots: eval metrics follow the task, speed is better high.
    better = {"eval": task_direction, "speed": "maximize"}
    return names, [better.get(n.split("/")[0], "minimize") for n in names]


def failure_from_log(job: Job) -> str | None:
    """Why a job outside a study wrote no metrics: the last line of its log, if that log shows an error."""
    log = job.path / "train.log"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    if not any("Traceback" in ln or "][ERROR]" in ln for ln in lines):
        return None
    return lines[-1].split("] - ", 1)[-1].strip()


def harness_scores(metrics: dict, names: list[str]) -> dict:
    """lm-evaluation-harness scores (harness/<task>/<metric>, baseline_harness/...) that are not the
    objective, without their standard errors."""
    return {
        k: v
        for k, v in metrics.items()
        if k.split("/")[0] in ("harness", "baseline_harness") and "_stderr" not in k and k not in names
    }


def trial_rows(jobs: list[Job], study: optuna.Study | None, names: list[str]) -> tuple[list[str], list[dict]]:
    """One row per trial (per job without a study), and the searched params' names in order."""
    rows = []
    if study is not None:
        by_number = {j.number: j for j in jobs}
        params = list(dict.fromkeys(p for t in study.trials for p in t.params))
        for t in study.trials:
            # The sweeper stores the measurements on the trial (a mean over its seeds): they are there
            # without the job dir (a storage URL, a trial run in another sweep dir).
            metrics = (
                t.user_attrs.get("metrics")
                or (by_number[t.number].metrics if t.number in by_number else None)
                or {}
            )
            row = {"trial": t.number, "state": t.state.name, **t.params}
            if (seed_values := t.user_attrs.get("seed_values")) and t.state.name == "COMPLETE":
                # Keyed by the objectives in order: from a storage URL alone their names are unknown.
                row["seed runs"] = [
                    dict(zip(names, v, strict=True)) for v in zip(*seed_values.values(), strict=True)
                ]
            row |= dict(zip(names, t.values or [None] * len(names), strict=True))
            row |= {k: metrics.get(k) for k in MEASURES if k not in names} | harness_scores(metrics, names)
            if t.state.name == "PRUNED":
                row["pruned at step"] = max(t.intermediate_values, default=None)
            reason = t.user_attrs.get("fail_reason") if t.state.name == "FAIL" else None
            rows.append(row | {"fail reason": reason})
        return params, rows
    # A plain multirun: the searched params are the overrides that differ between jobs.
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    params = [k for k in keys if len({repr(j.overrides.get(k)) for j in jobs}) > 1] or keys
    for job in jobs:
        reason = None if job.metrics else failure_from_log(job)
        state = "COMPLETE" if job.metrics else ("FAIL" if reason else "RUNNING")
        row = {"trial": job.number, "state": state, **{k: job.overrides.get(k) for k in params}}
        row |= {k: (job.metrics or {}).get(k) for k in [*names, *MEASURES] if k not in row}
        row |= harness_scores(job.metrics or {}, names)
        rows.append(row | {"fail reason": reason})
    return params, rows


def config_groups(rows: list[dict], params: list[str]) -> dict[str, list[dict]]:
    """The completed runs of each configuration (the runs that share every param but the seed), by label;
    a trial run with several seeds (hydra.sweeper.seeds) counts each seed's run."""
    keys = [p for p in params if p != SEED]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["state"] == "COMPLETE":
            runs = [row | run for run in row.get("seed runs", [{}])]
            groups.setdefault(", ".join(f"{k}={row.get(k)}" for k in keys) or "all runs", []).extend(runs)
    return groups


def fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and (value.is_integer() or abs(value) >= 1e3):
        return f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")[:160]


def markdown_table(columns: dict[str, str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(row.get(k)) for k in columns) + " |" for row in rows])


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:  # floats as repr: they read back exactly
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns} for row in rows)


def metric_label(name: str, direction: str) -> str:
    unit = UNITS.get(name) or ("fraction" if any(w in name for w in ("accuracy", "f1", "match")) else None)
    better = {"maximize": "↑ better", "minimize": "↓ better"}[direction]
    return f"{name} ({unit}, {better})" if unit else f"{name} ({better})"


def _numeric(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _summaries(groups: dict[str, list[dict]], key: str) -> dict[str, stats.Summary]:
    """Each configuration's summary of one metric, over its runs that report it."""
    values = {c: [r[key] for r in runs if _numeric(r.get(key))] for c, runs in groups.items()}
    return {c: stats.summarize(v) for c, v in values.items() if v}


def _error_bars(ax, points: list[tuple[float, stats.Summary]]) -> str:
    """Mean and 95% t-interval of each repeated configuration (a single run has none); returns the note
    for a plot without any."""
    points = [(x, s) for x, s in points if s.n >= 2]
    if not points:
        return "one run per configuration: no error bars, differences unconfirmed (see comparison.md)"
    means = [s.mean for _, s in points]
    low = [s.mean - s.ci_low for _, s in points]
    high = [s.ci_high - s.mean for _, s in points]
    ax.errorbar(
        [x for x, _ in points],
        means,
        yerr=[low, high],
        fmt="D",
        color="black",
        ms=5,
        capsize=5,
        elinewidth=1.2,
        zorder=3,
        label="mean, 95% t-interval over seeds",
    )
    return ""


def _save(fig: Figure, path: Path, rows: list[dict], note: str = "") -> None:
    failed = [str(r["trial"]) for r in rows if r["state"] == "FAIL"]
    if failed:  # listed, not plotted: a failed trial has no value
        note = f"{note}   failed trials, not plotted: {', '.join(failed)}".strip()
    if note:
        fig.text(0.01, 0.01, note, fontsize=9)
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    fig.savefig(path)  # a bare Figure renders with Agg: no pyplot state, no display needed


def plot_vs_param(rows, groups, param, names, dirs, title, path: Path) -> None:
    """Objective(s) against a numeric param: completed trials, pruned ones at their last report, and the
    mean with its interval where a configuration was repeated."""
    base = 2 if param == "adapter.r" else 10
    # Each mean sits right of its runs' points, the configurations sharing an x value side by side.
    at, taken = {}, {}
    for c, runs in groups.items():
        if _numeric(x := runs[0][param]):
            taken[x] = taken.get(x, 0) + 1
            at[c] = x * base ** (0.05 * taken[x])
    fig = Figure(figsize=(6.4 * len(names), 4.6))
    note = ""
    for ax, name, direction in zip(fig.subplots(1, len(names), squeeze=False)[0], names, dirs, strict=True):
        for state, style in STYLES.items():
            points = [
                (r[param], r[name]) for r in rows if r["state"] == state and _numeric(r[param], r[name])
            ]
            if points:
                label = state if state == "COMPLETE" else "PRUNED (last reported value)"
                ax.scatter([x for x, _ in points], [y for _, y in points], s=60, label=label, **style)
        note = _error_bars(ax, [(at[c], s) for c, s in _summaries(groups, name).items() if c in at])
        values = sorted({r[param] for r in rows if _numeric(r[param]) and r[param] > 0})
        ax.set_xscale("log", base=base)
        if param == "adapter.r":  # ranks are powers of two: label each as a plain number
            ax.set_xticks(values)
            ax.xaxis.set_major_formatter(ScalarFormatter())
        elif values:  # whole decades, labelled at 10^k only: minor labels (2x10^-3, ...) collide
            low, high = math.log10(values[0]), math.log10(values[-1])
            ax.set_xlim(10 ** math.floor(low - 0.05), 10 ** math.ceil(high + 0.05))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v))))
        ax.set(xlabel=PARAM_LABELS.get(param, param), ylabel=metric_label(name, direction))
        ax.set_title(f"{title}\n{name} vs {param}")
        if ax.get_legend_handles_labels()[0]:  # a sweep whose trials all failed has no points
            ax.legend(fontsize=9)
    _save(fig, path, rows, note)


def plot_heatmap(rows, alpha: str, name: str, direction: str, title: str, path: Path) -> None:
    """Mean objective of the completed trials in each (alpha, rank) cell, with the half-width of its 95%
    t-interval where the cell holds several; cells without one stay blank."""
    done = [r for r in rows if r["state"] == "COMPLETE" and _numeric(r[alpha], r["adapter.r"], r[name])]
    alphas = sorted({r[alpha] for r in rows if _numeric(r[alpha])})
    ranks = sorted({r["adapter.r"] for r in rows if _numeric(r["adapter.r"])})
    cells = [
        [[r[name] for r in done if (r[alpha], r["adapter.r"]) == (a, k)] or None for k in ranks]
        for a in alphas
    ]
    cells = [[cell and stats.summarize(cell) for cell in line] for line in cells]
    means = [[cell.mean if cell else math.nan for cell in line] for line in cells]
    fig = Figure(figsize=(1.2 * len(ranks) + 3.5, 0.8 * len(alphas) + 2.4))
    ax = fig.subplots()
    image = ax.imshow(means, cmap="viridis", aspect="auto")
    low, high = image.get_clim()
    for i, line in enumerate(cells):
        for j, cell in enumerate(line):
            if cell:  # dark text on the bright end of viridis, light text on the dark end
                color = "black" if (cell.mean - low) / ((high - low) or 1) > 0.6 else "white"
                spread = f" ± {(cell.ci_high - cell.ci_low) / 2:.2g}" if cell.n >= 2 else ""
                ax.text(j, i, f"{cell.mean:.4g}{spread}\nn={cell.n}", ha="center", va="center", color=color)
    ax.set_xticks(range(len(ranks)), [str(k) for k in ranks])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set(xlabel="LoRA rank adapter.r", ylabel=PARAM_LABELS[alpha])
    ax.set_title(f"{title}\nmean {name} per cell (± half-width of its 95% t-interval)")
    ax.grid(False)
    fig.colorbar(image, ax=ax, label=metric_label(name, direction))
    _save(fig, path, rows)


def plot_importances(study: optuna.Study, names: list[str], title: str, path: Path) -> str | None:
    """Optuna's param importances, per objective; returns why they were skipped, or None."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    # A param constant over the completed trials explains nothing: leave it out.
    searched = dict.fromkeys(p for t in done for p in t.params)
    varying = [p for p in searched if len({repr(t.params.get(p)) for t in done}) > 1]
    if len(done) < 2 or not varying:
        return "param importances need >= 2 completed trials and a param that varies among them"
    if len(varying) == 1:  # normalised importances sum to 1: a lone param gets 1 whatever the data
        return (
            f"param importances: only {varying[0]} varies, so it would get all the importance by definition"
        )
    fig = Figure(figsize=(6.4 * len(names), 2.7 + 0.7 * len(varying)))
    for i, ax in enumerate(fig.subplots(1, len(names), squeeze=False)[0]):
        with warnings.catch_warnings(record=True) as too_few:  # Optuna warns when trials are too few
            warnings.simplefilter("always")
            imp = get_param_importances(study, params=varying, target=lambda t, i=i: t.values[i])
        ax.bar_label(ax.barh(list(imp)[::-1], list(imp.values())[::-1]), fmt="%.2f", padding=3)
        ax.set(xlim=(0, 1.1), xlabel="importance (normalised: sums to 1)")
        ax.set_title(f"{title}\nparam importances for {names[i]}")
    _save(fig, path, [], f"{len(done)} completed trials" + (": too few, unreliable" if too_few else ""))
    return None


def plot_by_quant(groups, names, dirs, title, path: Path) -> None:
    """The objective and peak memory of each configuration, in order of quant bits: every run, and the mean
    with its interval where a configuration was repeated."""
    bits = {q: i for i, q in enumerate(QUANT_ORDER)}
    order = sorted(groups, key=lambda c: (bits.get(groups[c][0]["quant"], len(bits)), c))
    panels = [(names[0], dirs[0])]
    memory = any(_numeric(r.get("memory/peak_gib")) for runs in groups.values() for r in runs)
    panels += [("memory/peak_gib", "minimize")] if memory else []
    fig = Figure(figsize=(max(4.8, 1.3 * len(order) + 2.5) * len(panels), 4.8))
    notes = [] if memory else ["no memory/peak_gib: the jobs' metrics.json are not at hand"]
    for ax, (key, direction) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        points = [(i, r[key]) for i, c in enumerate(order) for r in groups[c] if _numeric(r.get(key))]
        ax.scatter(
            [x for x, _ in points], [y for _, y in points], s=40, alpha=0.6, label="run", **STYLES["COMPLETE"]
        )
        summaries = _summaries(groups, key)  # each mean just right of its runs' points
        notes.append(
            _error_bars(ax, [(i + 0.15, summaries[c]) for i, c in enumerate(order) if c in summaries])
        )
        ax.set_xticks(range(len(order)), [c.replace(", ", "\n") for c in order], fontsize=9)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v))))
        ax.set(xlabel="configuration (as in comparison.md)", ylabel=metric_label(key, direction))
        ax.set_title(f"{title}\n{key} by quantization")
        ax.legend(fontsize=9)
    _save(fig, path, [], "; ".join(dict.fromkeys(n for n in notes if n)))


def plot_pareto(study, rows, names, dirs, title, path: Path) -> None:
    """All completed trials in grey; the non-dominated ones (Optuna's best_trials) joined as a staircase."""
    points: dict[tuple, list[str]] = {}  # trials with equal values share one point and one label
    for t in study.best_trials:
        points.setdefault(tuple(t.values[:2]), []).append(f"#{t.number}")
    front = sorted(points)
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    done = [r for r in rows if r["state"] == "COMPLETE"]
    ax.scatter(
        [r[names[0]] for r in done], [r[names[1]] for r in done], s=50, color="0.65", label="all trials"
    )
    # Each corner of the staircase is the point that its two neighbours dominate.
    step = "steps-pre" if dirs[0] == "maximize" else "steps-post"
    ax.plot([x for x, _ in front], [y for _, y in front], "o-", color="tab:red", ms=8, drawstyle=step)
    ax.lines[-1].set_label("Pareto front")
    for xy in front:
        ax.annotate(", ".join(points[xy]), xy, textcoords="offset points", xytext=(6, 4))
    ax.set(xlabel=metric_label(names[0], dirs[0]), ylabel=metric_label(names[1], dirs[1]))
    ax.set_title(f"{title}: Pareto front of {names[0]} and {names[1]}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v))))
    ax.legend(fontsize=9)
    _save(fig, path, rows)


def write_plots(study, rows, groups, params, names, dirs, title, out: Path) -> list[str]:
    """Draw the plots that the study's params allow; returns Markdown lines (images and skip notes)."""
    lines = []
    with matplotlib.rc_context(RC):
        for param, png in (("adapter.r", "objective_vs_rank"), ("train.lr", "objective_vs_lr")):
            if param in params:
                plot_vs_param(rows, groups, param, names, dirs, title, out / f"{png}.png")
                lines.append(f"![{png}]({png}.png)")
        alpha = next((p for p in ("adapter.alpha_multiple", "adapter.alpha") if p in params), None)
        if alpha and "adapter.r" in params:
            plot_heatmap(rows, alpha, names[0], dirs[0], title, out / "alpha_rank_heatmap.png")
            lines.append("![alpha_rank_heatmap](alpha_rank_heatmap.png)")
        if "quant" in params and groups:
            plot_by_quant(groups, names, dirs, title, out / "objective_memory_by_quant.png")
            lines.append("![objective_memory_by_quant](objective_memory_by_quant.png)")
        skipped = plot_importances(study, names, title, out / "param_importances.png") if study else None
        lines.append(f"Skipped: {skipped}." if skipped else "![param_importances](param_importances.png)")
        if study is not None and len(names) >= 2:
            plot_pareto(study, rows, names, dirs, title, out / "pareto_front.png")
            lines.append("![pareto_front](pareto_front.png)")
    return lines


def comparison_section(groups, names, dirs, target: str, out_dir: Path) -> list[str]:
    """Compare the configurations on the first objective: writes comparison.csv and comparison.md and
    returns the section's Markdown (the table and what it can and cannot tell)."""
    name, direction = names[0], dirs[0]
    values = {c: [r[name] for r in runs if _numeric(r.get(name))] for c, runs in groups.items()}
    values = {c: v for c, v in values.items() if v}
    rows = stats.compare(values, direction) if values else []
    floor, df = stats.noise_floor(list(values.values()))
    for i, row in enumerate(rows):  # rows[0] is the best: the others differ from it
        row["below noise floor"] = "yes" if i and abs(row["diff_vs_best"]) < floor else None
    # No interval (a single run) is left blank, not written as nan.
    rows = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows
    ]
    write_csv(out_dir / "comparison.csv", list(stats.COMPARISON_COLUMNS), rows)
    lines = [
        f"Objective {name} ({direction}) per configuration, the runs that share every param but `{SEED}`: "
        f"mean and its {stats.CONFIDENCE:.0%} Student-t interval (ci_low, ci_high); the difference from the "
        f"best configuration and its {stats.CONFIDENCE:.0%} Welch interval (diff_ci_low, diff_ci_high). "
        "Verdict: `worse` where that interval excludes 0, else `within noise`. "
        f"{sum(map(len, values.values()))} completed runs; pruned, failed and unfinished trials have no "
        "final value."
    ]
    if len(names) > 1:
        lines.append(f"Compared on {name} only; the Pareto front weighs the {len(names)} objectives.")
    if not rows:
        lines.append("No completed run to compare.")
    elif len(rows) == 1:
        lines.append("One configuration only: nothing to compare it with, so its verdict is `unconfirmed`.")
    if df:
        lines.append(
            f"Noise floor (the seed-to-seed std of {name}, pooled within the repeated configurations, "
            f"{df} degrees of freedom): {fmt(floor)}. Differences from the best smaller than it are marked "
            "in the column *below noise floor*."
        )
    elif rows:
        lines.append(
            "No configuration was repeated with another seed: the seed-to-seed spread (the noise floor) is "
            "unknown and every difference here is unconfirmed."
        )
    if len(rows) > 1 and any(row["n"] < 2 for row in rows):
        sweep_dir = "<sweep dir>" if "://" in target else target  # confirm reruns a sweep dir's trials
        lines.append(
            "A configuration run once (n = 1) has no interval (blank) and the verdict `unconfirmed`. "
            f"Confirm the top 3 with 5 seeds each: `{CONFIRM.format(target=sweep_dir)}`"
        )
    headers = {c: c for c in stats.COMPARISON_COLUMNS} | (
        {"below noise floor": "below noise floor"} if df else {}
    )
    section = [*(f"{line}\n" for line in lines), markdown_table(headers, rows), ""]
    (out_dir / "comparison.md").write_text("\n".join(["# Comparison", "", *section]))
    return section


def param_efficiency(
    run: RunConfig, target_modules: list, ranks: list[int], layers: list | None = None
) -> tuple[list[dict], str]:
    """Trainable LoRA params per target modules, adapted layers (when the study varies them) and
    rank, counted by PEFT on the real architecture: rows and a heading."""
    path = build_tiny_model(run.model.tiny) if run.model.name_or_path is None else run.model.name_or_path
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=run.model.trust_remote_code)
    except (OSError, ValueError) as e:
        return [], f"Skipped: the config of {path} is not available offline ({str(e).splitlines()[0]})."
    auto = AutoModelForCausalLM
    if run.model.kind == "seq_cls":
        auto, config.num_labels = AutoModelForSequenceClassification, len(run.task.labels)
    rows = []
    for modules, which, r in itertools.product(target_modules, layers or [run.adapter.layers], ranks):
        with torch.device("meta"):  # shapes only: no weight is allocated or loaded
            model = auto.from_config(config, trust_remote_code=run.model.trust_remote_code)
        base = sum(p.numel() for p in model.parameters())
        # The init changes values, not counts (and loftq or pissa cannot run on meta tensors).
        adapter = replace(run.adapter, r=r, target_modules=modules, layers=which, init="gaussian")
        with warnings.catch_warnings():  # transformers' deprecation notices, raised inside PEFT
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora_config(model, adapter, run.model.kind))
        trainable, _ = peft_model.get_nb_trainable_parameters()
        rows.append({"target_modules": modules, **({"layers": which} if layers else {}), "r": r})
        rows[-1] |= {"trainable": trainable, "base params": base}
        rows[-1] |= {"trainable %": 100 * trainable / base, "reduction": base / trainable}
    arch = type(peft_model.get_base_model()).__name__
    return rows, f"Model `{run.model.name}` ({arch}), {rows[0]['base params']:,} base params."


def efficiency_section(jobs: list[Job], rows: list[dict], params: list[str]) -> tuple[list[dict], str]:
    if not jobs:
        return [], "Skipped: a storage URL names no model; report the sweep dir for this table."
    run, error = None, None
    for job in sorted(jobs, key=lambda j: j.metrics is None):  # a completed job's config was valid
        try:
            run = validate(job.cfg)
            break
        except ConfigError as e:  # e.g. a relative task.train_path, resolved from another cwd
            error = e
    if run is None:
        return [], f"Skipped: no job config validates from here ({error})."
    used = [r["adapter.target_modules"] for r in rows if "adapter.target_modules" in params]
    modules = list(dict.fromkeys(used)) or [run.adapter.target_modules]
    ranks = sorted({*RANKS, *(r["adapter.r"] for r in rows if isinstance(r.get("adapter.r"), int))})
    layers: list = []
    for row in rows if "adapter.layers" in params else []:
        layers += [row["adapter.layers"]] if row["adapter.layers"] not in layers else []
    try:
        return param_efficiency(run, modules, ranks, layers or None)
    except (ConfigError, ValueError, RuntimeError) as e:
        return [], f"Skipped: {str(e).splitlines()[0]}."


def report(target: str, study_name: str | None, out: str | None) -> Path:
    jobs, study, storage, default_out = load_source(target, study_name)
    out_dir = Path(out) if out else default_out
    out_dir.mkdir(parents=True, exist_ok=True)
    for png in PLOTS:  # an earlier report's plots that may no longer apply
        (out_dir / f"{png}.png").unlink(missing_ok=True)
    names, dirs = objectives(jobs, study)
    params, rows = trial_rows(jobs, study, names)
    groups = config_groups(rows, params)
    title = f"study {study.study_name}" if study else f"runs in {Path(target).resolve().name}"
    columns = {"trial": "trial", "state": "state", **{p: p for p in params}}
    columns |= {n: n if n.startswith("objective") else f"{n} (objective)" for n in names} | {
        k: v for k, v in MEASURES.items() if k not in names
    }
    columns |= {k: k for r in rows for k in harness_scores(r, names)}
    columns |= {"pruned at step": "pruned at step"} if any("pruned at step" in r for r in rows) else {}
    columns["fail reason"] = "fail reason"
    write_csv(out_dir / "report.csv", list(columns), rows)
    table = markdown_table(columns, rows)
    comparison = comparison_section(groups, names, dirs, target, out_dir)
    figures = write_plots(study, rows, groups, params, names, dirs, title, out_dir)
    eff_rows, eff_note = efficiency_section(jobs, rows, params)
    # the layers column only where the study varies adapter.layers
    eff_columns = {
        k: v for k, v in EFFICIENCY_COLUMNS.items() if k != "layers" or (eff_rows and "layers" in eff_rows[0])
    }
    if eff_rows:
        write_csv(out_dir / "param_efficiency.csv", list(eff_columns), eff_rows)

    states = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    source = f"`{without_password(target)}`"
    source += f", Optuna storage `{without_password(storage)}`" if storage not in (None, target) else ""
    md = [f"# Report: {title}", "", f"Source: {source}."]
    md += [f"Objective: {', '.join(f'{n} ({d})' for n, d in zip(names, dirs, strict=True))}."]
    md += [f"Trials: {', '.join(f'{n} {s}' for s, n in states.items())}.", "", "## Trials", "", table, ""]
    md += ["## Comparison", "", *comparison]
    md += ["## Figures", "", *(f"{line}\n" for line in figures), "## Parameter efficiency", "", eff_note, ""]
    md += [markdown_table(eff_columns, eff_rows), ""] if eff_rows else []
    (out_dir / "report.md").write_text("\n".join(md))
    print(out_dir / "report.md")
    print(table)
    print("\n".join(["", *comparison]))
    return out_dir / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.report", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a run dir, a sweep dir, or an Optuna storage URL")
    parser.add_argument("--study", help="the study's name (needed for a storage that holds several)")
    parser.add_argument("--out", help="where to write the report (default: the dir; for a URL, the cwd)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        report(args.target, args.study, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
