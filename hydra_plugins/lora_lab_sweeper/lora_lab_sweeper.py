"""The hydra-optuna-sweeper, extended for training sweeps (select with `hydra/sweeper=lora_lab_optuna`).

What it adds to the stock plugin, without replacing its sweep loop:
- each job gets `optuna_trial.{study_name,storage,trial_id,number}`, so the training loop can report
  to its own trial and ask the pruner (`hydra.sweeper.pruner`, any `optuna.pruners.*`);
- a job that raised `optuna.TrialPruned` ends PRUNED, a job that raised anything else ends FAIL with
  the reason in the trial's user attrs, and the sweep goes on (max_failure_rate defaults to 1.0);
- a SQLite storage path is made absolute and its directory created; job dirs are numbered by trial;
- on resume, trials that a killed sweep left RUNNING are marked FAIL first;
- at the end, besides the stock `optimization_results.yaml`, `study_summary.yaml` holds the trial
  counts per state and the override line that reruns the best trial as a single run.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf
from optuna.trial import TrialState

log = logging.getLogger(__name__)


def quote(value: Any) -> str:
    """Quote a value for Hydra's override grammar (storage URLs contain ':' and '/')."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def absolute_sqlite_url(storage: str) -> str:
    """Jobs may run in other working directories, and SQLite cannot create a missing folder."""
    path = storage.removeprefix("sqlite:///")
    if not path or path.startswith(":memory:"):
        return storage
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return "sqlite:///" + path


# PostgreSQL's codes for losing a race to create the same table, type or row: unique_violation,
# duplicate_table, duplicate_object.
SCHEMA_RACE_SQLSTATES = {"23505", "42P07", "42710"}


def create_or_load_study(**study_args: Any) -> optuna.Study:
    """Create or load the study. Workers that start together on an empty database race to create
    Optuna's tables; the loser gets a duplicate-table, duplicate-object or unique-violation error,
    depending on where the race is lost, and simply tries again."""
    for delay in (1, 2, 4):
        try:
            return optuna.create_study(**study_args, load_if_exists=True)
        except sqlalchemy.exc.DBAPIError as e:
            if getattr(e.orig, "sqlstate", None) not in SCHEMA_RACE_SQLSTATES:
                raise
            time.sleep(delay)
    return optuna.create_study(**study_args, load_if_exists=True)


class _OutcomeLauncher:
    """Wraps the real launcher to read each job's outcome before the stock loop tells Optuna."""

    def __init__(self, launcher: Any, sweeper: LoraLabSweeperImpl):
        self.launcher, self.sweeper = launcher, sweeper

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        self.sweeper.record_outcomes(returns)
        return returns


class LoraLabSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *args: Any, fail_stale_running: bool):
        super().__init__(*args)
        self.fail_stale_running = fail_stale_running
        self._batch: list[optuna.trial.Trial] = []
        self._pruned: set[int] = set()
        self._study: optuna.Study | None = None
        self._arguments: list[str] = []

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = _OutcomeLauncher(self.launcher, self)
        if self.study_name is None:  # a fixed name makes the study resumable and known to the jobs
            self.study_name = str(config.hydra.job.name)
        if self.storage is None:
            self.storage = f"sqlite:///{self.sweep_dir}/optuna.db"
        if isinstance(self.storage, str) and self.storage.startswith("sqlite:///"):
            self.storage = absolute_sqlite_url(self.storage)

    def sweep(self, arguments: list[str]) -> None:
        self._arguments = list(arguments)
        study = self._open_study()
        existing = study.get_trials(deepcopy=False)
        if self.fail_stale_running:
            for trial in existing:
                if trial.state == TrialState.RUNNING:
                    study._storage.set_trial_user_attr(
                        trial._trial_id, "fail_reason", "left RUNNING by an interrupted sweep"
                    )
                    study.tell(trial.number, state=TrialState.FAIL)
                    log.warning(
                        "trial %d was left RUNNING by an interrupted sweep: marked FAIL", trial.number
                    )
        if existing:
            self.job_idx = len(existing)  # job dir numbers follow the study's trial numbers
            # A seeded sampler would otherwise replay the first trials' parameters.
            if hasattr(self.sampler, "reseed_rng"):
                self.sampler.reseed_rng()
            log.info("resuming study %s with %d earlier trials", self.study_name, len(existing))
        try:
            super().sweep(arguments)
        except ValueError as e:  # the stock loop asks for best_trial even when none completed
            if self._study is None or self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                raise
            log.warning("no trial completed (%s): optimization_results.yaml not written", e)
        self._write_summary()

    def _open_study(self) -> optuna.Study:
        return create_or_load_study(
            study_name=self.study_name, storage=self.storage, directions=self._get_directions()
        )

    def _configure_trials(self, trials: list, *args: Any) -> Any:
        self._batch = list(trials)
        if self._study is None:
            self._study = trials[0].study
            self._tell_pruned_as_pruned(self._study)
        overrides = super()._configure_trials(trials, *args)
        return [
            (
                *override,
                f"++optuna_trial.study_name={quote(trial.study.study_name)}",
                f"++optuna_trial.storage={quote(self.storage)}",
                f"++optuna_trial.trial_id={trial._trial_id}",
                f"++optuna_trial.number={trial.number}",
            )
            for override, trial in zip(overrides, trials, strict=True)
        ]

    def _tell_pruned_as_pruned(self, study: optuna.Study) -> None:
        """The stock loop tells only COMPLETE or FAIL; a pruned job's trial must end PRUNED."""
        tell = study.tell

        def tell_with_pruning(trial: Any, values: Any = None, state: Any = None, **kwargs: Any) -> Any:
            number = trial if isinstance(trial, int) else trial.number
            if number in self._pruned:
                state, values = TrialState.PRUNED, None
            try:
                return tell(trial, values=values, state=state, **kwargs)
            except RuntimeError as e:
                # GridSampler calls study.stop() once the grid is done, which raises outside
                # optimize(); the trial's state is stored before that. The stock loop ignores
                # this for COMPLETE trials only, so a failing last grid point crashed the sweep.
                if "Study.stop" not in str(e):
                    raise
                return None

        study.tell = tell_with_pruning

    def record_outcomes(self, returns: list) -> None:
        n_objectives = len(self._get_directions())
        for trial, ret in zip(self._batch, returns, strict=True):
            outcome = ret._return_value  # the property would re-raise a job's exception
            if ret.status == JobStatus.FAILED and isinstance(outcome, optuna.TrialPruned):
                self._pruned.add(trial.number)
                ret.status = JobStatus.COMPLETED
                ret.return_value = math.nan if n_objectives == 1 else [math.nan] * n_objectives
                log.info("trial %d pruned: %s", trial.number, outcome)
            elif ret.status == JobStatus.FAILED and isinstance(outcome, BaseException):
                trial.set_user_attr("fail_reason", f"{type(outcome).__name__}: {outcome}"[:1000])
                trial.set_user_attr("fail_traceback", "".join(traceback.format_exception(outcome))[-4000:])

    def _write_summary(self) -> None:
        study = self._study
        if study is None:
            return
        trials = study.get_trials(deepcopy=False)
        summary: dict[str, Any] = {
            "study_name": study.study_name,
            "storage": self.storage,
            "directions": self._get_directions(),
            "trial_states": {s.name: sum(t.state == s for t in trials) for s in TrialState},
        }
        if len(summary["directions"]) == 1 and any(t.state == TrialState.COMPLETE for t in trials):
            best = study.best_trial
            params = {**best.user_attrs, **best.params}
            params = {k: v for k, v in params.items() if not k.startswith("fail_")}
            fixed = [a for a in self._arguments if "(" not in a and a.split("=")[0] not in params]
            summary["best_trial"] = best.number
            summary["best_value"] = best.value
            summary["best_command"] = " ".join(
                ["python -m lora_lab.train", *fixed, *(f"{k.lstrip('+')}={v}" for k, v in params.items())]
            )
            log.info("rerun the best trial with: %s", summary["best_command"])
        OmegaConf.save(OmegaConf.create(summary), f"{self.sweep_dir}/study_summary.yaml")


class LoraLabOptunaSweeper(OptunaSweeper):
    def __init__(self, pruner: Any = None, fail_stale_running: bool = True, **kwargs: Any):
        super().__init__(**kwargs)  # instantiates the sampler
        if pruner:
            # Jobs prune themselves (lora_lab/pruning.py builds the pruner from this config);
            # building it here makes a bad pruner config fail the sweep before any trial runs.
            instantiate(pruner, _execution_whitelist_="optuna.pruners.*")
        stock = self.sweeper
        self.sweeper = LoraLabSweeperImpl(
            stock.sampler,
            kwargs["direction"],
            stock.storage,
            stock.study_name,
            stock.n_trials,
            stock.n_jobs,
            stock.max_failure_rate,
            kwargs["custom_search_space"],
            stock.params,
            fail_stale_running=fail_stale_running,
        )


@dataclass
class LoraLabOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.lora_lab_sweeper.lora_lab_sweeper.LoraLabOptunaSweeper"
    # e.g. {_target_: optuna.pruners.MedianPruner, n_startup_trials: 2}; null: no pruning
    pruner: Any = None
    # Mark trials left RUNNING by a killed sweep as FAIL on resume. Turn off when several
    # workers share one study: their running trials would be marked too.
    fail_stale_running: bool = True
    max_failure_rate: float = 1.0  # a failing trial fails alone, never the sweep
    n_jobs: int = 1  # trials per batch; they run in parallel only under a parallel launcher (joblib)


ConfigStore.instance().store(
    group="hydra/sweeper", name="lora_lab_optuna", node=LoraLabOptunaSweeperConf, provider="lora_lab"
)
