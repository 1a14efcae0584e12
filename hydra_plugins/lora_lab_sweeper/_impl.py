"""The lora_lab_optuna sweeper's loop (see lora_lab_sweeper.py for what it adds): the stock sweeper's
loop with the study opened, checked and locked first, each batch's trials beating and run once per
seed, and the summary written at the end. The jobs it does live in the modules beside it.

Hydra imports every plugin module at start-up except those named with a leading underscore: this one
and those beside it import optuna and SQLAlchemy, so they load only when a sweep starts."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import sys
from collections import Counter
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from hydra_plugins.lora_lab_sweeper._heartbeats import Heartbeats, fail_stale_trials, stale_trial_logger
from hydra_plugins.lora_lab_sweeper._identity import check_identity, claim_dir, study_identity
from hydra_plugins.lora_lab_sweeper._outcomes import (
    SUCCEEDED,
    keep_attrs,
    tell_pruned_as_pruned,
    trial_outcome,
)
from hydra_plugins.lora_lab_sweeper._seeds import SEED, check_seeds, seed_job, trial_seeds
from hydra_plugins.lora_lab_sweeper._storage import (
    absolute_sqlite_url,
    create_or_load_study,
    password_to_environment,
)
from hydra_plugins.lora_lab_sweeper._summary import (
    objective_names,
    progress_line,
    stock_results_hidden,
    write_seedless_results,
    write_summary,
)
from lora_lab.commands import quote
from lora_lab.errors import ConfigError
from lora_lab.interrupts import Interrupted, interrupts_raised

log = logging.getLogger(__name__)


def is_grid(sampler: Any) -> bool:
    """The stock loop's test: it builds the GridSampler from the search space itself."""
    return isinstance(sampler, functools.partial) and sampler.func == optuna.samplers.GridSampler


class _OutcomeLauncher:
    """Wraps the real launcher: runs each trial once per seed (hydra.sweeper.seeds), and reads each
    trial's outcome before the stock loop tells Optuna."""

    def __init__(self, launcher: Any, sweeper: LoraLabSweeperImpl):
        self.launcher, self.sweeper = launcher, sweeper

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        seeds = trial_seeds(self.sweeper.config, self.sweeper.seeds)
        batch = self.sweeper.batch
        jobs = [
            seed_job(o, t.number, s, self.sweeper.seeds)
            for o, t in zip(job_overrides, batch, strict=True)
            for s in seeds
        ]
        # Job numbers stay distinct across batches (trial i's seed k is job i * n + k); the stock loop
        # counts one per trial, so the job dirs keep the trial numbers.
        returns = self.launcher.launch(jobs, initial_job_idx=initial_job_idx * len(seeds))
        by_trial = [returns[i : i + len(seeds)] for i in range(0, len(returns), len(seeds))]
        return self.sweeper.record_outcomes(by_trial, seeds)


class LoraLabSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *args: Any, heartbeat_interval: int, grace_period: int, seeds: int):
        super().__init__(*args)
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.seeds = seeds
        self.heartbeats = Heartbeats()
        self.batch: list[optuna.trial.Trial] = []
        self._pruned: set[int] = set()
        self._study: optuna.Study | None = None
        self._arguments: list[str] = []
        self._ran: list[int] = []  # numbers of the trials this sweep ran
        self._dir_lock: int | None = None
        self._heartbeat_study: optuna.Study | None = None

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
        """The sweep, leaving the process as it found it (signal handlers, Optuna's log level, the
        sweep dir's lock), for an app that sweeps in a process that goes on."""
        verbosity = optuna.logging.get_verbosity()
        # Optuna's own INFO lines ("A new study created", then the stock loop's "Using an existing
        # study", a line per trial) give way to one progress line per trial (_log_progress).
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            with interrupts_raised():
                self._sweep(arguments)
        finally:
            optuna.logging.set_verbosity(verbosity)
            if self._dir_lock is not None:
                os.close(self._dir_lock)  # closing the file ends its lock
                self._dir_lock = None

    def _sweep(self, arguments: list[str]) -> None:
        self._arguments = list(arguments)
        distributions, fixed_params, deletions = self._split_overrides(arguments)
        identity = study_identity(self.config, self._get_directions(), fixed_params, deletions)
        try:
            check_seeds(self.seeds, self.config, distributions)
            study = self._open_study()
            check_identity(study, identity)
            self._dir_lock = claim_dir(self.sweep_dir)  # held until the sweep ends
        except ConfigError as e:
            log.error("%s", e)
            sys.exit(2)
        existing = study.get_trials(deepcopy=False)
        self._heartbeat_study = study
        fail_stale_trials(study)
        if not existing:
            log.info("new study %s in %s", self.study_name, make_url(self.storage).render_as_string())
        else:
            self.job_idx = len(existing)  # job dir numbers follow the study's trial numbers
            log.info("resuming study %s with %d earlier trials", self.study_name, len(existing))
            if is_grid(self.sampler):
                self._enqueue_grid_points_left(study, distributions)
            elif hasattr(self.sampler, "reseed_rng"):
                # A seeded sampler would otherwise replay the first trials' parameters.
                self.sampler.reseed_rng()
        seed_searched = SEED in distributions  # a seeds axis: the stock loop's best params would name it
        try:
            with stock_results_hidden(seed_searched):
                super().sweep(arguments)
            if seed_searched:
                write_seedless_results(study, self.config, self.sweep_dir)
        except ValueError as e:  # the stock loop asks for best_trial even when none completed
            if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                raise
            log.warning("no trial completed (%s): optimization_results.yaml not written", e)
        except Interrupted as e:
            self._fail_interrupted_trials(study)
            log.error(
                "sweep interrupted by %s: the running trial(s) marked FAIL (interrupted); finished "
                "trials are kept in study %s, rerun the same command to resume it",
                e.signal_name,
                self.study_name,
            )
            sys.exit(e.exit_status)
        finally:
            self.heartbeats.end_all()
        study = self._study or study  # no trial ran (a complete grid): summarise the study as it is
        write_summary(study, self.storage, self.config, self._arguments, self.sweep_dir)
        self._exit_if_no_trial_completed(study)

    def _fail_interrupted_trials(self, study: optuna.Study) -> None:
        """The batch's trials that were running when the signal came end FAIL, reason `interrupted`;
        a resumed grid runs their points again."""
        study = self._study or study  # the stock loop's, whose tell logs progress and ends heartbeats
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for trial in self.batch:
            if trial.number in running:
                trial.set_user_attr("fail_reason", "interrupted")
                study.tell(trial.number, state=TrialState.FAIL)

    def _log_progress(self, number: int) -> None:
        count = f"{self._ran.index(number) + 1} of {self.n_trials}" if number in self._ran else None
        log.info("%s", progress_line(self._study, number, count))

    def _split_overrides(self, arguments: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """The stock loop's split of the sweeper's params and the sweep's overrides: the search space
        (less the params an override fixes), the fixed params, and the deletions."""
        self._process_searchspace_config()
        distributions, fixed_params, deletions = create_params_from_overrides(
            [*self._parse_sweeper_params_config(), *arguments]
        )
        return {k: d for k, d in distributions.items() if k not in fixed_params}, fixed_params, deletions

    def _open_study(self) -> optuna.Study:
        """Check the heartbeat settings, take the password out of the storage URL, and open the study
        on a heartbeat storage, for this worker's heartbeats and its stale-trial checks; the stock
        loop asks and tells through a plain one (Optuna warns of asking on a heartbeat storage
        outside optimize())."""
        if self.heartbeat_interval <= 0:
            raise ConfigError("hydra.sweeper.heartbeat_interval", self.heartbeat_interval, "seconds > 0")
        if self.grace_period < 2 * self.heartbeat_interval:
            raise ConfigError(
                "hydra.sweeper.grace_period",
                self.grace_period,
                f"at least twice hydra.sweeper.heartbeat_interval ({self.heartbeat_interval} s), or a "
                "live worker's trial may be marked FAIL between two of its heartbeats",
            )
        self.storage = password_to_environment(self.storage, self.config.hydra)
        heartbeat = dict(
            heartbeat_interval=self.heartbeat_interval,
            grace_period=self.grace_period,
            heartbeat_stale_trial_callback=stale_trial_logger(self.grace_period),
        )
        return create_or_load_study(
            storage=self.storage,
            storage_args=heartbeat,
            study_name=self.study_name,
            directions=self._get_directions(),
        )

    def _enqueue_grid_points_left(self, study: optuna.Study, distributions: dict[str, Any]) -> None:
        """Resuming a grid runs each point without a finished trial (COMPLETE or PRUNED), once: the
        points left that no worker runs or has queued are enqueued with all their params, and the
        sweep runs exactly the queue. GridSampler is not used then: it counts FAIL points as done and
        picks points by trial number, so it re-ran finished points and never retried failed ones."""
        names = sorted(distributions)
        grid = list(itertools.product(*(self._to_grid_sampler_choices(distributions[n]) for n in names)))

        def point(params: dict[str, Any]) -> tuple:
            return tuple(params.get(name) for name in names)

        trials = study.get_trials(deepcopy=False)
        taken = {point(t.params) for t in trials if t.state in (*SUCCEEDED, TrialState.RUNNING)}
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        queued = [point(t.system_attrs.get("fixed_params", t.params)) for t in waiting]
        left = [p for p in grid if p not in taken and p not in queued]
        for p in left[: max(0, self.n_trials - len(queued))]:
            study.enqueue_trial(dict(zip(names, p, strict=True)))
        self.n_trials = min(self.n_trials, len(queued) + len(left))
        self.sampler = optuna.samplers.RandomSampler()  # never asked: every trial's params are queued
        if self.n_trials == 0:
            log.info("all %d points of the grid have a finished trial: nothing to run", len(grid))
        else:
            log.info("running the grid's %d of %d points without a finished trial", self.n_trials, len(grid))

    def _exit_if_no_trial_completed(self, study: optuna.Study) -> None:
        """Trials ran and none completed (all failed, or other workers ended them): exit non-zero,
        with the states read back from the storage."""
        ran = [t for t in study.get_trials(deepcopy=False) if t.number in self._ran]
        if not ran or any(t.state in SUCCEEDED for t in ran):
            return
        counts = Counter(t.state.name for t in ran)
        log.error(
            "no trial of this sweep completed: %d ran, %s",
            len(ran),
            ", ".join(f"{n} {state}" for state, n in sorted(counts.items())),
        )
        sys.exit(1)

    def _configure_trials(self, trials: list, *args: Any) -> Any:
        self.batch = list(trials)
        self._ran += [trial.number for trial in trials]
        if self._study is None:
            self._study = trials[0].study
            tell_pruned_as_pruned(
                self._study,
                self._pruned,
                self.grace_period,
                told=self._log_progress,
                ended=self.heartbeats.end,
            )
        # Before this batch beats: its trials have no heartbeat yet either way.
        fail_stale_trials(self._heartbeat_study)
        self.heartbeats.start(trials, self._heartbeat_study)
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

    def record_outcomes(self, by_trial: list[list], seeds: list[int]) -> list:
        """One JobReturn per trial of the batch, for the stock loop to tell (see trial_outcome)."""
        names = objective_names(self.config, len(self._get_directions()))
        returns = []
        for trial, jobs in zip(self.batch, by_trial, strict=True):
            ret, attrs, pruned = trial_outcome(jobs, seeds, names)
            if pruned:
                self._pruned.add(trial.number)
            keep_attrs(trial, attrs)
            returns.append(ret)
        return returns
