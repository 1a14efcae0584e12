"""Each trial's outcome from its jobs' returns, as the stock loop will tell it: pruned, failed (with the
reason), or its value (the mean over seeds) with its jobs' measurements; and Optuna's tell made to end
a pruned trial PRUNED."""

from __future__ import annotations

import json
import logging
import math
import os
import traceback
from collections.abc import Callable
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from optuna.trial import TrialState

from hydra_plugins.lora_lab_sweeper._seeds import fold_seed_values, mean_over_seeds

log = logging.getLogger(__name__)

# A trial that ended so has its answer: a pruned one ended as its pruner meant, a failed one did not.
SUCCEEDED = (TrialState.COMPLETE, TrialState.PRUNED)
# The trial user attrs this sweeper writes (the stock loop adds the fixed params): no override.
TRIAL_ATTRS = {"fail_reason", "fail_traceback", "job_dirs", "metrics", "seeds", "seed_values", "seed_std"}


def job_dir(ret: Any) -> str | None:
    return ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg is not None else None


def read_metrics(directory: str | None) -> dict[str, float] | None:
    path = os.path.join(directory, "metrics.json") if directory else None
    if path is None or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def trial_outcome(returns: list, seeds: list, names: list[str]) -> tuple[Any, dict[str, Any], bool]:
    """One trial's JobReturn for the stock loop to tell, the user attrs to keep on the trial, and
    whether it was pruned: a pruned seed prunes the trial, a failed one fails it (its reason names
    the seed), else the value is the mean over the seeds. The attrs hold its jobs' dirs and
    metrics.json values (means over the seeds) and, with repeats, the per-seed values."""
    pruned = [
        r for r in returns if r.status == JobStatus.FAILED and isinstance(r._return_value, optuna.TrialPruned)
    ]
    failed = [(s, r) for s, r in zip(seeds, returns, strict=True) if r.status == JobStatus.FAILED]
    attrs: dict[str, Any] = {"job_dirs": [d for d in map(job_dir, returns) if d]}
    if pruned:
        ret = pruned[0]
        ret.status = JobStatus.COMPLETED
        ret.return_value = math.nan if len(names) == 1 else [math.nan] * len(names)
        return ret, attrs, True
    if failed:
        seed, ret = failed[0]
        outcome = ret._return_value  # the property would re-raise a job's exception
        if isinstance(outcome, BaseException):
            prefix = f"seed {seed}: " if len(seeds) > 1 else ""
            attrs["fail_reason"] = f"{prefix}{type(outcome).__name__}: {outcome}"[:1000]
            attrs["fail_traceback"] = "".join(traceback.format_exception(outcome))[-4000:]
        return ret, attrs, False
    ret = returns[0]
    measured = [m for m in (read_metrics(job_dir(r)) for r in returns) if m]
    if measured:
        keys = [k for k in measured[0] if all(k in m for m in measured)]
        attrs["metrics"] = {k: mean_over_seeds([m[k] for m in measured]) for k in keys}
    if len(seeds) > 1:  # one seed: the stock loop checks and tells the job's value as it is
        values = [r.return_value if len(names) > 1 else [r.return_value] for r in returns]
        means, seed_attrs = fold_seed_values(values, names, seeds)
        ret.return_value = means[0] if len(names) == 1 else means
        attrs |= seed_attrs
    return ret, attrs, False


def keep_attrs(trial: optuna.trial.Trial, attrs: dict[str, Any]) -> None:
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # another worker ended the trial: telling it logs that


def tell_pruned_as_pruned(
    study: optuna.Study,
    pruned: set[int],
    grace_period: int,
    told: Callable[[int], None],
    ended: Callable[[int], None],
) -> None:
    """The stock loop tells only COMPLETE or FAIL; a pruned job's trial must end PRUNED. `told(number)`
    runs once a trial's outcome is stored, `ended(number)` after every tell."""
    tell = study.tell

    def tell_with_pruning(trial: Any, values: Any = None, state: Any = None, **kwargs: Any) -> Any:
        number = trial if isinstance(trial, int) else trial.number
        if number in pruned:
            state, values = TrialState.PRUNED, None
        try:
            result = tell(trial, values=values, state=state, **kwargs)
            told(number)
            return result
        except (RuntimeError, ValueError) as e:
            # GridSampler calls study.stop() once the grid is done, which raises outside
            # optimize(); the trial's state is stored before that. The stock loop ignores
            # this for COMPLETE trials only, so a failing last grid point crashed the sweep.
            if "Study.stop" in str(e):
                told(number)
                return None
            # Another worker ended the trial (it found the heartbeat stale): Optuna refuses
            # to tell it again. Crashing would lose the rest of this sweep too.
            finished = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
            if not finished.state.is_finished():
                raise
            log.warning(
                "trial %d was already ended %s by another worker, which found its heartbeat older "
                "than %d s: its outcome here (%s) is not recorded",
                number,
                finished.state.name,
                grace_period,
                values if state == TrialState.COMPLETE else state.name,
            )
            return finished
        finally:
            ended(number)

    study.tell = tell_with_pruning
