"""What a sweep tells its user: a progress line per finished trial, and study_summary.yaml with the
trial counts, the command that reruns the best trial (or each Pareto-front trial) and whether the best
configuration beats the runner-up beyond noise."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
import yaml
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
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


def progress_line(study: optuna.Study, number: int, count: str | None) -> str:
    """`trial 7 COMPLETE value 0.812 (8 of 20 in this sweep; best 0.845, trial 3)` for a finished
    trial: trials by the number Optuna stores (its job dir's name), `count` its place in this sweep."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    line = f"trial {number} {trial.state.name}"
    if trial.state == TrialState.COMPLETE:
        line += " value " + ", ".join(f"{v:.4g}" for v in trial.values)
    elif trial.state == TrialState.PRUNED and trial.intermediate_values:
        line += f" at step {max(trial.intermediate_values)}"
    elif trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs:
        line += f": {trial.user_attrs['fail_reason'].splitlines()[0][:200]}"
    notes = [f"{count} in this sweep"] if count else []
    if len(study.directions) > 1:
        notes.append(f"{len(study.best_trials)} trials on the Pareto front")
    elif study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        notes.append(f"best {best.value:.4g}, trial {best.number}")
    return f"{line} ({'; '.join(notes)})" if notes else line


@dataclass
class Configuration:
    """The COMPLETE trials that share every param but train.seed, and their runs' values of the first
    objective (a trial's per-seed values with hydra.sweeper.seeds, else its value)."""

    params: dict[str, Any]
    trials: list[optuna.trial.FrozenTrial] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.params.items())) or "all runs"


def configurations(study: optuna.Study, name: str) -> dict[str, Configuration]:
    found: dict[str, Configuration] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        params = {k: v for k, v in t.params.items() if k != SEED}
        configuration = found.setdefault(Configuration(params).label, Configuration(params))
        configuration.trials.append(t)
        configuration.values += t.user_attrs.get("seed_values", {}).get(name, [t.values[0]])
    return found


def best_configuration(study: optuna.Study, name: str) -> Configuration:
    """The configuration of the best mean: a seed is not a setting, so with train.seed searched the
    best trial may be a lucky seed of a worse configuration."""
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    return min(configurations(study, name).values(), key=lambda c: sign * statistics.fmean(c.values))


def winner(study: optuna.Study, config: Any, sweep_dir: str) -> dict[str, Any] | None:
    """Whether the best configuration beats the runner-up beyond noise (lora_lab.stats.compare), over
    the runs of each configuration. None for an app without train.seed, whose configurations cannot
    be repeated with other seeds."""
    if OmegaConf.select(config, SEED, default=None) is None:
        return None
    found = configurations(study, objective_names(config, 1)[0])
    groups = {label: c.values for label, c in found.items()}
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
    names = objective_names(config, len(directions))
    if len(directions) == 1 and completed:
        best = study.best_trial
        summary["best_trial"] = best.number
        summary["best_value"] = best.value
        chosen = best_configuration(study, names[0])
        summary["best_configuration"] = {
            "params": chosen.params,
            "mean": statistics.fmean(chosen.values),
            "runs": len(chosen.values),
            "trials": [t.number for t in chosen.trials],
        }
        summary["best_command"] = rerun_command(chosen.trials[0], arguments)
        if len(chosen.values) > 1:
            log.info(
                "best configuration %s: mean %.4g over %d runs (trials %s)",
                chosen.label,
                summary["best_configuration"]["mean"],
                len(chosen.values),
                ", ".join(map(str, summary["best_configuration"]["trials"])),
            )
        log.info("rerun the best configuration with: %s", summary["best_command"])
        if (result := winner(study, config, sweep_dir)) is not None:
            summary["winner"] = result
            log.info("%s", result["line"])
    elif len(directions) > 1 and completed:
        commands: dict[str, dict[str, Any]] = {}  # trials that differ only in train.seed: one command
        for t in study.best_trials:
            command = rerun_command(t, arguments)
            commands.setdefault(command, {"trial": t.number, "values": list(t.values), "command": command})
        summary["pareto_commands"] = list(commands.values())
        for entry in summary["pareto_commands"]:
            log.info("rerun Pareto-front trial %d with: %s", entry["trial"], entry["command"])
    # Wide lines: a command split over two YAML lines loses its params when copied.
    with open(f"{sweep_dir}/study_summary.yaml", "w") as f:
        yaml.safe_dump(summary, f, width=math.inf, sort_keys=False, allow_unicode=True)


# The stock loop's closing lines, which name train.seed among the best params when it is searched.
STOCK_RESULT_LINES = ("Best parameters:", "Best value:", "Number of Pareto solutions:", "    Values:")


@contextlib.contextmanager
def stock_results_hidden(hidden: bool) -> Iterator[None]:
    """Without the stock loop's closing lines when `hidden`: write_seedless_results says them."""
    stock = logging.getLogger(OptunaSweeperImpl.__module__)

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(STOCK_RESULT_LINES)

    if hidden:
        stock.addFilter(keep)
    try:
        yield
    finally:
        stock.removeFilter(keep)


def write_seedless_results(study: optuna.Study, config: Any, sweep_dir: str) -> None:
    """The stock optimization_results.yaml with train.seed searched: the best configuration's params
    and mean (one objective), or the Pareto front's configurations, never a seed."""
    names = objective_names(config, len(study.directions))
    results: dict[str, Any] = {"name": "optuna"}
    if len(study.directions) == 1:
        chosen = best_configuration(study, names[0])
        results |= {"best_params": chosen.params, "best_value": statistics.fmean(chosen.values)}
        log.info("Best parameters: %s", chosen.params)
        log.info("Best value: %s (the mean of its %d runs)", results["best_value"], len(chosen.values))
    else:
        solutions = []
        for t in study.best_trials:
            params = {k: v for k, v in t.params.items() if k != SEED}
            if params not in [s["params"] for s in solutions]:
                solutions.append({"params": params, "values": list(t.values)})
        results["solutions"] = solutions
        log.info("Number of Pareto solutions: %d", len(solutions))
    OmegaConf.save(OmegaConf.create(results), f"{sweep_dir}/optimization_results.yaml")
