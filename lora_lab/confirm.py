"""Confirm a sweep's winners: rerun its top configurations with fresh seeds and compare them.

python -m lora_lab.confirm multirun/2025-06-01/12-00-00 --top 3 --seeds 5
python -m lora_lab.confirm sqlite:///multirun/optuna.db --study-name lora_tiny_sort --top 3 --seeds 5

The sweep is an Optuna study (its sweep dir or storage URL: the COMPLETE trials) or a plain Hydra
multirun (its dir: the jobs that wrote metrics.json, ranked on their optimized_metric). Its runs are
grouped into configurations (all but train.seed), ranked by their mean, and each of the top K runs
again, one job's config exactly (the sweep's fixed overrides and its params), as one Hydra multirun over
train.seed, with the basic sweeper and the sweep's launcher settings (hydra/launcher=joblib,
submitit_slurm, ... and their hydra.launcher.*), its jobs in <sweep dir>/confirm/trial<n>_seed<seed>
(job<n>_seed<seed> for a multirun's job n). The seeds are ones no run of the sweep used. Then
lora_lab.report compares them there: comparison.md and comparison.csv, one row per configuration.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from optuna.trial import TrialState

from lora_lab.commands import key_of, quote
from lora_lab.errors import ConfigError, exit_on_config_error
from lora_lab.report import report
from lora_lab.report.sources import Job, ReportError, load_source, objectives

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SEED = "train.seed"
# Not part of a configuration: the sweeper's bookkeeping and the seed. The sweep's preset groups
# select the Optuna sweeper; what else they set comes back from the job's saved config.
NOT_CONFIG = ("optuna_trial", SEED)
PRESET_GROUPS = ("hparams_search", "experiment")
# Hydra settings of the sweep that are not the confirm's own (its sweeper and dirs).
SWEEP_ONLY = ("hydra.sweep", "hydra/sweeper", "hydra.sweeper", "hydra.mode")


def override_value(value: Any) -> str:
    """A config value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(map(override_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    return quote(value)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a config container by dotted key (lists are leaves)."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out |= leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def configuration(job: Path) -> tuple[list[str], list[str], str]:
    """A trial's job as a confirm run's overrides: the task overrides (the job's config exactly, less
    the seed, without the sweep's preset group), the sweep's hydra overrides less its sweeper and dirs,
    and the dir the sweep ran in (relative paths in its overrides start there)."""
    from hydra import compose, initialize_config_dir

    saved = OmegaConf.load(job / ".hydra" / "config.yaml")
    hydra_cfg = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra
    task = [
        o
        for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")
        if not key_of(o).startswith(NOT_CONFIG) and key_of(o) not in PRESET_GROUPS
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        composed = compose(config_name=hydra_cfg.job.config_name, overrides=task)
    want = {k: v for k, v in leaves(OmegaConf.to_container(saved)).items() if not k.startswith(NOT_CONFIG)}
    have = leaves(OmegaConf.to_container(composed))
    task += [f"++{k}={override_value(v)}" for k, v in want.items() if k not in have or have[k] != v]
    task += [f"~{k}" for k in have if k not in want and not k.startswith(NOT_CONFIG)]
    launcher = [o for o in hydra_cfg.overrides.hydra if not key_of(o).startswith(SWEEP_ONLY)]
    return task, launcher, hydra_cfg.runtime.cwd


def trial_job(trial: Any, jobs: dict[int, Path]) -> Path:
    """A job dir of the trial: the one its user attrs name (a study read from its storage), else the sweep dir's."""
    dirs = [Path(d) for d in trial.user_attrs.get("job_dirs", [])] + (
        [jobs[trial.number]] if trial.number in jobs else []
    )
    for path in dirs:
        if (path / ".hydra" / "config.yaml").exists():
            return path
    raise ConfigError(
        "target",
        f"trial {trial.number}",
        "a study whose job dirs are here (its .hydra/ configs are not found)",
    )


@dataclass
class Candidate:
    """A configuration of the sweep: its runs' values of the first objective, and a job that ran it
    (its saved config is the one confirm reruns), named for the confirm's job dirs."""

    name: str
    values: list[float]
    job: Path


def study_candidates(target: str, study: Any, jobs: list[Job]) -> tuple[list[Candidate], str]:
    """The COMPLETE trials of a study, one candidate per configuration (its params less train.seed)."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ConfigError(
            "target", target, f"a study with a COMPLETE trial (study {study.study_name} has none)"
        )
    by_number = {j.number: j.path for j in jobs}
    found: dict[str, Candidate] = {}
    for t in complete:  # a multi-objective study: ranked by its first objective
        key = repr(sorted((k, v) for k, v in t.params.items() if k != SEED))
        if key not in found:
            found[key] = Candidate(f"trial{t.number}", [], trial_job(t, by_number))
        per_seed = list(t.user_attrs.get("seed_values", {}).values())  # by objective, in order
        found[key].values += per_seed[0] if per_seed else [t.values[0]]
    return list(found.values()), study.directions[0].name.lower()


def multirun_candidates(target: str, jobs: list[Job]) -> tuple[list[Candidate], str]:
    """The jobs of a plain Hydra multirun that wrote metrics, one candidate per configuration (its
    overrides less train.seed), ranked on its first objective (optimized_metric)."""
    names, directions = objectives(jobs, None)
    found: dict[str, Candidate] = {}
    for job in jobs:
        if job.metrics is None or names[0] not in job.metrics:
            continue
        key = repr(sorted((k, repr(v)) for k, v in job.overrides.items() if k != SEED))
        if key not in found:
            found[key] = Candidate(f"job{job.number}", [], job.path)
        found[key].values.append(job.metrics[names[0]])
    if not found:
        raise ConfigError("target", target, f"a multirun with a finished job (none here wrote {names[0]})")
    return list(found.values()), directions[0]


def used_seeds(jobs: list[Job], study: Any) -> set[int]:
    seeds = {int(j.cfg.train.seed) for j in jobs if OmegaConf.select(j.cfg, SEED) is not None}
    for t in study.trials if study is not None else []:
        seeds |= set(t.user_attrs.get("seeds", []))
        if SEED in t.params:
            seeds.add(int(t.params[SEED]))
        for path in (Path(d) for d in t.user_attrs.get("job_dirs", [])):
            if (path / ".hydra" / "config.yaml").exists():
                seeds.add(int(OmegaConf.load(path / ".hydra" / "config.yaml").train.seed))
    return seeds


def confirm(target: str, study_name: str | None, top: int, n_seeds: int) -> Path:
    """Rerun the top configurations, compare them; returns the confirm dir."""
    if top < 1:
        raise ConfigError("--top", top, "an integer >= 1 (how many of the best configurations to rerun)")
    if n_seeds < 2:
        raise ConfigError(
            "--seeds", n_seeds, "an integer >= 2 (runs per configuration, to measure the noise)"
        )
    try:
        jobs, study, _, _ = load_source(target, study_name)
    except ReportError as e:
        raise ConfigError(
            "target", target, f"a finished sweep's dir, or its study's storage URL ({e})"
        ) from None
    candidates, direction = (
        study_candidates(target, study, jobs) if study is not None else multirun_candidates(target, jobs)
    )
    sign = -1 if direction == "maximize" else 1
    best = sorted(candidates, key=lambda c: sign * statistics.fmean(c.values))[:top]
    start = max(used_seeds(jobs, study), default=-1) + 1
    seeds = list(range(start, start + n_seeds))
    out = (best[0].job.parent / "confirm").resolve()  # the runs start in the sweep's cwd
    print(f"confirming {', '.join(c.name for c in best)} with seeds {seeds} in {out}")
    failed = []
    for candidate in best:
        task, launcher, cwd = configuration(candidate.job)
        args = [sys.executable, "-m", "lora_lab.train", "-m", *task, f"{SEED}={','.join(map(str, seeds))}"]
        args += ["hydra/sweeper=basic", *launcher, f"hydra.sweep.dir={quote(out)}"]
        args += [f"hydra.sweep.subdir={candidate.name}_seed${{{SEED}}}"]
        if subprocess.run(args, cwd=cwd).returncode != 0:
            failed.append(candidate.name)
    report(str(out), None, None)
    if failed:
        print(f"error: a run of {', '.join(failed)} failed (see its log in {out})", file=sys.stderr)
        sys.exit(1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.confirm", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="the study's sweep dir, or its Optuna storage URL")
    parser.add_argument(
        "--study-name", "--study", dest="study", help="the study (for a storage that holds several)"
    )
    parser.add_argument("--top", type=int, default=3, help="how many of the best COMPLETE trials to rerun")
    parser.add_argument("--seeds", type=int, default=5, help="fresh seeds per configuration")
    args = parser.parse_args(argv)
    with exit_on_config_error():
        confirm(args.target, args.study, args.top, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
