"""Where a report's runs come from: a run dir, a sweep dir (its job dirs and, for an Optuna sweep, its
study) or an Optuna storage URL; and what the runs optimised."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

VALID = (
    "give a run dir (with .hydra/), a sweep dir (with study_summary.yaml or job dirs 0/, 1/, ...) "
    "or an Optuna storage URL (sqlite:///path.db, postgresql://...) with --study"
)


class ReportError(Exception):
    """Bad command-line input: one line for the user, exit code 2."""


@dataclass
class Job:
    """A Hydra job dir: its saved config, its overrides (values as the command line wrote them), and
    metrics.json (None if it wrote none)."""

    path: Path
    cfg: DictConfig
    overrides: dict[str, Any]
    metrics: dict | None
    number: int | None  # the Optuna trial number the sweeper passed it, else the job dir's number


OVERRIDES = OverridesParser.create()


def load_job(path: Path) -> Job:
    cfg, overrides = OmegaConf.load(path / ".hydra/config.yaml"), {}
    for line in (
        OmegaConf.load(path / ".hydra/overrides.yaml") if (path / ".hydra/overrides.yaml").exists() else []
    ):
        override = OVERRIDES.parse_override(line)
        if not override.key_or_group.startswith(("optuna_trial.", "hydra")):
            # Hydra's typing of the text (4 stays 4 where the schema makes it 4.0; quant=nf4 is a name);
            # a list or dict as written.
            value = None if override.is_delete() else override.value()
            overrides[override.key_or_group] = (
                line.partition("=")[2] if isinstance(value, (list, dict)) else value
            )
    number = OmegaConf.select(cfg, "optuna_trial.number", default=None)
    if number is None and path.name.isdigit():
        number = int(path.name)
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else None
    return Job(path, cfg, overrides, metrics, number)


def natural_order(path: Path) -> list:
    """trial3_seed10 after trial3_seed9: the digits of a name compared as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_jobs(path: Path) -> list[Job]:
    """The job dirs of a sweep dir, in order. Dirs not named by a number (confirm's trial3_seed43) are
    numbered in their names' order, after the numbered ones."""
    jobs = [
        load_job(p)
        for p in sorted(path.iterdir(), key=natural_order)
        if (p / ".hydra" / "config.yaml").exists()
    ]
    start = max((j.number + 1 for j in jobs if j.number is not None), default=0)
    for offset, job in enumerate(j for j in jobs if j.number is None):
        job.number = start + offset
    return sorted(jobs, key=lambda j: j.number)


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
        job = load_job(path)
        job.number = job.number or 0
        return [job], None, None, path
    jobs = load_jobs(path)
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
