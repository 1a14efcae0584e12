"""What a sweep tells its user: a progress line per finished trial, and study_summary.yaml with the
trial counts, the command that reruns the best trial (or each Pareto-front trial) and whether the best
configuration beats the runner-up beyond noise."""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

import optuna
import yaml
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.lora_lab_sweeper._outcomes import TRIAL_ATTRS
from hydra_plugins.lora_lab_sweeper._seeds import SEED
from lora_lab import stats
from lora_lab.commands import CONFIRM

log = logging.getLogger(__name__)


def objective_names(config: Any, n_objectives: int) -> list[str]:
    """The objectives by name: lora_lab's optimized_metric, or for another app `objective`
    (`objective_<i>` for several), as the stock sweeper leaves them unnamed."""
    metric = OmegaConf.select(config, "optimized_metric", default=None)
    if metric is None:
        return ["objective"] if n_objectives == 1 else [f"objective_{i}" for i in range(n_objectives)]
    return [metric] if isinstance(metric, str) else list(metric)


def program() -> str:
    """How this Hydra app was started: `python -m lora_lab.train`, or `python <its script>`."""
    script = os.path.normpath(sys.argv[0])
    if script.endswith(os.path.join("lora_lab", "train.py")):
        return "python -m lora_lab.train"
    return f"python {sys.argv[0]}"


def rerun_command(trial: optuna.trial.FrozenTrial, arguments: list[str]) -> str:
    """The single run of a trial's configuration: the program, the sweep's fixed overrides and its
    params as the search space names them (`+w` adds a key the app's config lacks), but not a trial's
    own train.seed (a seed is not a setting: a fixed one stays)."""
    params = {
        k: v for k, v in {**trial.user_attrs, **trial.params}.items() if k not in TRIAL_ATTRS and k != SEED
    }
    fixed = [a for a in arguments if "(" not in a and a.split("=")[0] not in params]
    return " ".join([program(), *fixed, *(f"{k}={v}" for k, v in params.items())])


def progress_line(study: optuna.Study, number: int, position: str) -> str:
    """`trial 7/20 COMPLETE value 0.812 (best 0.845, #3)` for a finished trial."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    line = f"trial {position} {trial.state.name}"
    if trial.state == TrialState.COMPLETE:
        line += " value " + ", ".join(f"{v:.4g}" for v in trial.values)
    elif trial.state == TrialState.PRUNED and trial.intermediate_values:
        line += f" at step {max(trial.intermediate_values)}"
    elif trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs:
        line += f" ({trial.user_attrs['fail_reason'].splitlines()[0][:200]})"
    if len(study.directions) == 1:
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best = study.best_trial
            line += f" (best {best.value:.4g}, #{best.number})"
    else:
        line += f" ({len(study.best_trials)} trials on the Pareto front)"
    return line


def winner(study: optuna.Study, config: Any, sweep_dir: str) -> dict[str, Any] | None:
    """Whether the best configuration beats the runner-up beyond noise (lora_lab.stats.compare):
    the configurations are the COMPLETE trials' params less train.seed, each run's value the
    trial's per-seed values (hydra.sweeper.seeds) or its value. None for an app without
    train.seed, whose configurations cannot be repeated with other seeds."""
    if OmegaConf.select(config, SEED, default=None) is None:
        return None
    name = objective_names(config, 1)[0]
    groups: dict[str, list[float]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        configuration = ", ".join(f"{k}={v}" for k, v in sorted(t.params.items()) if k != SEED) or "all runs"
        groups.setdefault(configuration, []).extend(t.user_attrs.get("seed_values", {}).get(name, [t.value]))
    if len(groups) < 2:
        return None
    best, runner_up = stats.compare(groups, study.direction.name.lower())[:2]
    result = {
        "best": best["config"],
        "best_mean": best["mean"],
        "best_n": best["n"],
        "runner_up": runner_up["config"],
        "runner_up_mean": runner_up["mean"],
        "runner_up_n": runner_up["n"],
        "difference": runner_up["diff_vs_best"],  # runner-up minus best
        "difference_ci_low": runner_up["diff_ci_low"],
        "difference_ci_high": runner_up["diff_ci_high"],
    }
    numbers = (
        f"best {best['config']} mean {best['mean']:.4g} (n={best['n']}), runner-up "
        f"{runner_up['config']} mean {runner_up['mean']:.4g} (n={runner_up['n']})"
    )
    if runner_up["verdict"] == "unconfirmed":
        result["confirmed"] = None
        confirm = CONFIRM.format(target=sweep_dir)
        result["line"] = (
            f"winner unconfirmed: no repeats to measure the noise ({numbers}); confirm with: {confirm}"
        )
    else:
        result["confirmed"] = runner_up["verdict"] == "worse"
        interval = (
            f"difference {runner_up['diff_vs_best']:.4g}, {stats.CONFIDENCE:.0%} Welch interval "
            f"[{runner_up['diff_ci_low']:.4g}, {runner_up['diff_ci_high']:.4g}]"
        )
        verdict = "confirmed: beats" if result["confirmed"] else "not confirmed: within noise of"
        result["line"] = f"winner {verdict} the runner-up ({numbers}; {interval})"
    return result


def write_summary(
    study: optuna.Study, storage: str, config: Any, arguments: list[str], sweep_dir: str
) -> None:
    trials = study.get_trials(deepcopy=False)
    directions = [d.name.lower() for d in study.directions]
    summary: dict[str, Any] = {
        "study_name": study.study_name,
        "storage": storage,
        "directions": directions,
        "trial_states": {s.name: sum(t.state == s for t in trials) for s in TrialState},
    }
    completed = any(t.state == TrialState.COMPLETE for t in trials)
    if len(directions) == 1 and completed:
        best = study.best_trial
        summary["best_trial"] = best.number
        summary["best_value"] = best.value
        summary["best_command"] = rerun_command(best, arguments)
        log.info("rerun the best trial with: %s", summary["best_command"])
        if (result := winner(study, config, sweep_dir)) is not None:
            summary["winner"] = result
            log.info("%s", result["line"])
    elif len(directions) > 1 and completed:
        summary["pareto_commands"] = [
            {"trial": t.number, "values": list(t.values), "command": rerun_command(t, arguments)}
            for t in study.best_trials
        ]
        for entry in summary["pareto_commands"]:
            log.info("rerun Pareto-front trial %d with: %s", entry["trial"], entry["command"])
    # Wide lines: a command split over two YAML lines loses its params when copied.
    with open(f"{sweep_dir}/study_summary.yaml", "w") as f:
        yaml.safe_dump(summary, f, width=math.inf, sort_keys=False, allow_unicode=True)
