"""Confirm a study's winners: rerun its top configurations with fresh seeds and compare them.

python -m lora_lab.confirm multirun/2025-06-01/12-00-00 --top 3 --seeds 5
python -m lora_lab.confirm sqlite:///multirun/optuna.db --study-name lora_tiny_sort --top 3 --seeds 5

Each of the top-K COMPLETE trials' configurations (its job's config: the sweep's fixed overrides and
the trial's params) runs as one Hydra multirun over train.seed, with the basic sweeper and the sweep's
launcher settings (hydra/launcher=joblib, submitit_slurm, ... and their hydra.launcher.*), its jobs in
<sweep dir>/confirm/trial<n>_seed<seed>. The seeds are ones no trial of the study used. Then
lora_lab.report compares them there: comparison.md and comparison.csv, one row per configuration.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lora_lab.commands import key_of, quote
from lora_lab.errors import ConfigError, exit_on_config_error
from lora_lab.report import report
from lora_lab.report.sources import ReportError, load_source

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


def used_seeds(trials: list, jobs: dict[int, Path]) -> set[int]:
    seeds = set()
    for t in trials:
        seeds |= set(t.user_attrs.get("seeds", []))
        if SEED in t.params:
            seeds.add(int(t.params[SEED]))
        for path in [*(Path(d) for d in t.user_attrs.get("job_dirs", [])), jobs.get(t.number)]:
            if path is not None and (path / ".hydra" / "config.yaml").exists():
                seeds.add(int(OmegaConf.load(path / ".hydra" / "config.yaml").train.seed))
    return seeds


def confirm(target: str, study_name: str | None, top: int, n_seeds: int) -> Path:
    """Rerun the top configurations, compare them; returns the confirm dir."""
    from optuna.trial import TrialState

    if top < 1:
        raise ConfigError("--top", top, "an integer >= 1 (how many of the best trials to rerun)")
    if n_seeds < 2:
        raise ConfigError(
            "--seeds", n_seeds, "an integer >= 2 (runs per configuration, to measure the noise)"
        )
    try:
        jobs, study, _, _ = load_source(target, study_name)
    except ReportError as e:
        raise ConfigError(
            "target", target, f"a finished study's sweep dir, or its storage URL ({e})"
        ) from None
    if study is None:
        raise ConfigError("target", target, "a sweep dir of an Optuna study (this one holds no study)")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ConfigError(
            "target", target, f"a study with a COMPLETE trial (study {study.study_name} has none)"
        )
    sign = -1 if study.directions[0].name == "MAXIMIZE" else 1  # a multi-objective study: by its first
    best = sorted(complete, key=lambda t: sign * t.values[0])[:top]
    by_number = {j.number: j.path for j in jobs}
    runs = [(t, trial_job(t, by_number)) for t in best]
    start = max(used_seeds(study.trials, by_number), default=-1) + 1
    seeds = list(range(start, start + n_seeds))
    out = (runs[0][1].parent / "confirm").resolve()  # the runs start in the sweep's cwd
    print(f"confirming trials {', '.join(str(t.number) for t, _ in runs)} with seeds {seeds} in {out}")
    failed = []
    for trial, job in runs:
        task, launcher, cwd = configuration(job)
        args = [sys.executable, "-m", "lora_lab.train", "-m", *task, f"{SEED}={','.join(map(str, seeds))}"]
        args += ["hydra/sweeper=basic", *launcher, f"hydra.sweep.dir={quote(out)}"]
        args += [f"hydra.sweep.subdir=trial{trial.number}_seed${{{SEED}}}"]
        if subprocess.run(args, cwd=cwd).returncode != 0:
            failed.append(trial.number)
    report(str(out), None, None)
    if failed:
        print(
            f"error: a run of trial(s) {', '.join(map(str, failed))} failed (see its log in {out})",
            file=sys.stderr,
        )
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
