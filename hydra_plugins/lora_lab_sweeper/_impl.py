"""The lora_lab_optuna sweeper's implementation (see lora_lab_sweeper.py for what it adds).

Hydra imports every plugin module at start-up except those named with a leading underscore: this one
imports optuna and SQLAlchemy, so it loads only when a sweep starts."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from typing import Any

import optuna
import sqlalchemy
import yaml
from hydra.core.utils import JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf, open_dict, read_write
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from lora_lab import stats
from lora_lab.commands import CONFIRM, key_of, quote
from lora_lab.errors import ConfigError
from lora_lab.interrupts import Interrupted, raise_on_interrupt

log = logging.getLogger(__name__)


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


def create_or_load_study(
    storage: str, storage_args: dict[str, Any] | None = None, **study_args: Any
) -> optuna.Study:
    """Create or load the study on RDBStorage(storage, **storage_args). Workers that start together
    on an empty database race to create Optuna's tables (RDBStorage creates them); the loser gets a
    duplicate-table, duplicate-object or unique-violation error, depending on where the race is lost,
    and simply tries again."""

    def attempt() -> optuna.Study:
        with warnings.catch_warnings():  # heartbeat_interval is an experimental argument
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(storage, **(storage_args or {}))
        return optuna.create_study(storage=rdb, **study_args, load_if_exists=True)

    for delay in (1, 2, 4):
        try:
            return attempt()
        except sqlalchemy.exc.DBAPIError as e:
            if getattr(e.orig, "sqlstate", None) not in SCHEMA_RACE_SQLSTATES:
                raise
            time.sleep(delay)
    return attempt()


# SQLAlchemy's PostgreSQL drivers built on libpq, which reads PGPASSWORD when the URL has no password.
LIBPQ_DRIVERS = {"psycopg", "psycopg2", "psycopg2cffi"}


# A trial that ended so has its answer: a pruned one ended as its pruner meant, a failed one did not.
SUCCEEDED = (TrialState.COMPLETE, TrialState.PRUNED)
IDENTITY_ATTR = "sweep_identity"  # the study user attr holding study_identity()
# The trial user attrs this sweeper writes (the stock loop adds the fixed params): no override.
TRIAL_ATTRS = {"fail_reason", "fail_traceback", "job_dirs", "metrics", "seeds", "seed_values", "seed_std"}
SEED = "train.seed"
DATA_FILE_KEYS = ("task.train_path", "task.eval_path")


def study_identity(
    config: Any, directions: list[str], fixed_params: dict[str, Any], deletions: list[str]
) -> dict[str, str]:
    """What makes a study's trials comparable, key by key: the objectives and their directions, the
    sweep's fixed overrides (not its swept params), and each data file as an absolute path with a
    hash of its content, since the same path may hold other rows by the next sweep."""
    identity = {key: str(value) for key, value in fixed_params.items()}
    identity |= dict.fromkeys(deletions, "deleted")
    metric = OmegaConf.select(config, "optimized_metric", default=None)  # lora_lab's key; any Hydra app
    if metric is not None:  # without it is identified by its directions and overrides alone
        identity["optimized_metric"] = metric if isinstance(metric, str) else ",".join(metric)
    identity["hydra.sweeper.direction"] = ",".join(directions)
    for key in DATA_FILE_KEYS:
        path = OmegaConf.select(config, key, default=None)
        if path:
            path = os.path.abspath(path)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    path += f" (sha256 {hashlib.file_digest(f, 'sha256').hexdigest()[:16]})"
            identity[key] = path
    return identity


def program() -> str:
    """How this Hydra app was started: `python -m lora_lab.train`, or `python <its script>`."""
    script = os.path.normpath(sys.argv[0])
    if script.endswith(os.path.join("lora_lab", "train.py")):
        return "python -m lora_lab.train"
    return f"python {sys.argv[0]}"


def check_identity(study: optuna.Study, identity: dict[str, str]) -> None:
    """Record the identity in a new study; refuse to resume one whose trials ran with other settings.
    Workers that start one study at once write the same identity, and the first write stands."""
    new_study = "hydra.sweeper.study_name=<a new name>"
    stored = study.user_attrs.get(IDENTITY_ATTR)
    if stored is None:
        if trials := study.get_trials(deepcopy=False):
            raise ConfigError(
                "hydra.sweeper.study_name",
                study.study_name,
                f"its {len(trials)} trials ran with settings it does not record (not a lora_lab study): "
                f"start a new study with {new_study}",
            )
        study.set_user_attr(IDENTITY_ATTR, identity)
        stored = study.user_attrs[IDENTITY_ATTR]
    differences = [
        f"{key}: {identity.get(key, 'not set')} here, {stored.get(key, 'not set')} in the study"
        for key in sorted(identity.keys() | stored.keys())
        if identity.get(key) != stored.get(key)
    ]
    if differences:
        raise ConfigError(
            "hydra.sweeper.study_name",
            study.study_name,
            f"its trials ran with other settings ({'; '.join(differences)}): resume it with those, "
            f"or start a new study with {new_study}",
        )


def claim_dir(path: str) -> int:
    """Lock the sweep dir for as long as this process runs (the lock ends with it), so that two
    sweeps started at once never write into one dir, while a later sweep may still reuse it."""
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, ".sweep.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            "hydra.sweep.dir", path, "a dir no running sweep writes to: pass another hydra.sweep.dir"
        ) from None
    return fd


def is_grid(sampler: Any) -> bool:
    """The stock loop's test: it builds the GridSampler from the search space itself."""
    return isinstance(sampler, functools.partial) and sampler.func == optuna.samplers.GridSampler


def job_dir(ret: Any) -> str | None:
    return ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg is not None else None


def read_metrics(directory: str | None) -> dict[str, float] | None:
    path = os.path.join(directory, "metrics.json") if directory else None
    if path is None or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def mean_over_seeds(values: list[float]) -> float:
    """The mean, and a value the seeds agree on as it is (a count stays an int)."""
    return values[0] if all(v == values[0] for v in values) else statistics.fmean(values)


class _OutcomeLauncher:
    """Wraps the real launcher: runs each trial once per seed (hydra.sweeper.seeds), and reads each
    trial's outcome before the stock loop tells Optuna."""

    def __init__(self, launcher: Any, sweeper: LoraLabSweeperImpl):
        self.launcher, self.sweeper = launcher, sweeper

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        seeds = self.sweeper.trial_seeds()
        jobs = [
            self.sweeper.seed_job(o, t, s)
            for o, t in zip(job_overrides, self.sweeper._batch, strict=True)
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
        self._heartbeats: dict[int, Any] = {}  # trial number -> the thread beating for it until told
        self._batch: list[optuna.trial.Trial] = []
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

    def _password_to_environment(self) -> str:
        """The storage URL without its password, which moves to PGPASSWORD: in the URL it would be
        copied into every job's overrides and logs, Hydra's .hydra/ files and the W&B run. Jobs
        inherit the environment (every launcher starts them with it) and libpq reads it there."""
        url = make_url(self.storage)
        if url.password is None:
            return self.storage
        masked = url.render_as_string(hide_password=True)
        if url.get_backend_name() != "postgresql" or url.get_driver_name() not in LIBPQ_DRIVERS:
            raise ConfigError(
                "hydra.sweeper.storage",
                masked,
                "a password in the URL is taken only for PostgreSQL (psycopg); give it the way this "
                "database's client reads it, outside the URL",
            )
        os.environ["PGPASSWORD"] = url.password
        # Hydra writes the sweep's config into each job's .hydra/ and composes each job from these
        # overrides: both get the masked URL, which replaces any set in a config file too.
        hydra = self.config.hydra
        with read_write(hydra), open_dict(hydra):
            hydra.sweeper.storage = masked
            overrides = hydra.overrides.hydra
            hydra.overrides.hydra = [
                *(o for o in overrides if o.split("=")[0].lstrip("+") != "hydra.sweeper.storage"),
                f"hydra.sweeper.storage={quote(masked)}",
            ]
        sys.argv = [a.replace(self.storage, masked) for a in sys.argv]  # W&B runs record the command line
        return url._replace(password=None).render_as_string(hide_password=False)  # set() skips None

    def sweep(self, arguments: list[str]) -> None:
        raise_on_interrupt()
        # Optuna's own INFO lines ("A new study created", then the stock loop's "Using an existing
        # study", a line per trial) give way to one progress line per trial (_log_progress).
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._arguments = list(arguments)
        distributions, fixed_params, deletions = self._split_overrides(arguments)
        identity = study_identity(self.config, self._get_directions(), fixed_params, deletions)
        try:
            self._check_seeds(distributions)
            study = self._open_study()
            check_identity(study, identity)
            self._dir_lock = claim_dir(self.sweep_dir)  # held until the process ends
        except ConfigError as e:
            log.error("%s", e)
            sys.exit(2)
        existing = study.get_trials(deepcopy=False)
        self._heartbeat_study = study
        self._fail_stale_trials()
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
        try:
            super().sweep(arguments)
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
            for heartbeat in self._heartbeats.values():  # left by an error: its thread would hang the exit
                heartbeat.join()
        if self._study is None:  # no trial ran (a complete grid): summarise the study as it is
            self._study = study
        self._write_summary()
        self._exit_if_no_trial_completed()

    def _check_seeds(self, distributions: dict[str, Any]) -> None:
        if self.seeds < 1:  # the config's type makes it an int
            raise ConfigError(
                "hydra.sweeper.seeds", self.seeds, "an integer >= 1 (runs per sampled configuration)"
            )
        if self.seeds > 1 and OmegaConf.select(self.config, SEED, default=None) is None:
            raise ConfigError(
                "hydra.sweeper.seeds",
                self.seeds,
                f"1 for an app without a {SEED} key (repeats set it): this config has none",
            )
        if self.seeds > 1 and SEED in distributions:
            raise ConfigError(
                "hydra.sweeper.seeds",
                self.seeds,
                f"1 when {SEED} is searched (hydra.sweeper.seeds sets it): drop one of the two",
            )

    def trial_seeds(self) -> list[int | None]:
        """The train.seed values of each trial's jobs: the config's train.seed + 0 .. seeds - 1; one
        job, as the config has it (None for an app without train.seed), without repeats."""
        seed = OmegaConf.select(self.config, SEED, default=None)
        return [seed] if self.seeds == 1 else [int(seed) + k for k in range(self.seeds)]

    def seed_job(self, overrides: tuple, trial: optuna.trial.Trial, seed: int) -> tuple:
        """A trial's job for one seed: with repeats, train.seed set and the job dir `<trial>_seed<seed>`
        (the stock `<trial>` otherwise)."""
        if self.seeds == 1:
            return overrides
        kept = tuple(o for o in overrides if key_of(o) != SEED)
        return (*kept, f"{SEED}={seed}", f"hydra.sweep.subdir={trial.number}_seed{seed}")

    def _fail_interrupted_trials(self, study: optuna.Study) -> None:
        """The batch's trials that were running when the signal came end FAIL, reason `interrupted`;
        a resumed grid runs their points again."""
        study = self._study or study  # the stock loop's, whose tell logs progress and ends heartbeats
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for trial in self._batch:
            if trial.number in running:
                trial.set_user_attr("fail_reason", "interrupted")
                study.tell(trial.number, state=TrialState.FAIL)

    def _log_progress(self, study: optuna.Study, number: int) -> None:
        """One line per finished trial: `trial 7/20 COMPLETE value 0.812 (best 0.845, #3)`."""
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        position = f"{self._ran.index(number) + 1}/{self.n_trials}" if number in self._ran else f"#{number}"
        line = f"trial {position} {trial.state.name}"
        if trial.state == TrialState.COMPLETE:
            line += " value " + ", ".join(f"{v:.4g}" for v in trial.values)
        elif trial.state == TrialState.PRUNED and trial.intermediate_values:
            line += f" at step {max(trial.intermediate_values)}"
        elif trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs:
            line += f" ({trial.user_attrs['fail_reason'].splitlines()[0][:200]})"
        if len(self._get_directions()) == 1:
            if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                best = study.best_trial
                line += f" (best {best.value:.4g}, #{best.number})"
        else:
            line += f" ({len(study.best_trials)} trials on the Pareto front)"
        log.info("%s", line)

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
        self.storage = self._password_to_environment()
        heartbeat = dict(
            heartbeat_interval=self.heartbeat_interval,
            grace_period=self.grace_period,
            heartbeat_stale_trial_callback=self._log_stale_trial,
        )
        return create_or_load_study(
            storage=self.storage,
            storage_args=heartbeat,
            study_name=self.study_name,
            directions=self._get_directions(),
        )

    def _fail_stale_trials(self) -> None:
        with warnings.catch_warnings():  # fail_stale_trials is experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self._heartbeat_study)

    def _log_stale_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning(
            "trial %d had no heartbeat for over %d s (its worker was killed or lost the database): "
            "marked FAIL",
            trial.number,
            self.grace_period,
        )

    def _beat_until_told(self, trials: list) -> None:
        """A trial lives while the worker that will tell its outcome does: the heartbeat runs from
        ask to tell, across a job's queueing and the wait for the rest of a parallel batch."""
        for trial in trials:
            heartbeat = get_heartbeat_thread(trial._trial_id, self._heartbeat_study._storage)
            heartbeat.start()
            self._heartbeats[trial.number] = heartbeat

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

    def _exit_if_no_trial_completed(self) -> None:
        """Trials ran and none completed (all failed, or other workers ended them): exit non-zero,
        with the states read back from the storage."""
        ran = [t for t in self._study.get_trials(deepcopy=False) if t.number in self._ran]
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
        self._batch = list(trials)
        self._ran += [trial.number for trial in trials]
        if self._study is None:
            self._study = trials[0].study
            self._tell_pruned_as_pruned(self._study)
        self._fail_stale_trials()  # before this batch beats: its trials have no heartbeat yet either way
        self._beat_until_told(trials)
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
                told = tell(trial, values=values, state=state, **kwargs)
                self._log_progress(study, number)
                return told
            except (RuntimeError, ValueError) as e:
                # GridSampler calls study.stop() once the grid is done, which raises outside
                # optimize(); the trial's state is stored before that. The stock loop ignores
                # this for COMPLETE trials only, so a failing last grid point crashed the sweep.
                if "Study.stop" in str(e):
                    self._log_progress(study, number)
                    return None
                # Another worker ended the trial (it found the heartbeat stale): Optuna refuses
                # to tell it again. Crashing would lose the rest of this sweep too.
                ended = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
                if not ended.state.is_finished():
                    raise
                log.warning(
                    "trial %d was already ended %s by another worker, which found its heartbeat older "
                    "than %d s: its outcome here (%s) is not recorded",
                    number,
                    ended.state.name,
                    self.grace_period,
                    values if state == TrialState.COMPLETE else state.name,
                )
                return ended
            finally:
                if (heartbeat := self._heartbeats.pop(number, None)) is not None:
                    heartbeat.join()

        study.tell = tell_with_pruning

    def record_outcomes(self, by_trial: list[list], seeds: list[int]) -> list:
        """One JobReturn per trial, for the stock loop to tell: a pruned seed prunes the trial, a failed
        one fails it (its reason names the seed), else the value is the mean over the seeds. Each
        trial keeps, as user attrs, its jobs' dirs and metrics.json values (means over the seeds) and,
        with repeats, the seeds, each objective's per-seed values and their std."""
        n_objectives = len(self._get_directions())
        folded = []
        for trial, returns in zip(self._batch, by_trial, strict=True):
            pruned = [
                r
                for r in returns
                if r.status == JobStatus.FAILED and isinstance(r._return_value, optuna.TrialPruned)
            ]
            failed = [(s, r) for s, r in zip(seeds, returns, strict=True) if r.status == JobStatus.FAILED]
            attrs: dict[str, Any] = {"job_dirs": [d for d in map(job_dir, returns) if d]}
            if pruned:
                ret = pruned[0]
                self._pruned.add(trial.number)
                ret.status = JobStatus.COMPLETED
                ret.return_value = math.nan if n_objectives == 1 else [math.nan] * n_objectives
            elif failed:
                seed, ret = failed[0]
                outcome = ret._return_value  # the property would re-raise a job's exception
                if isinstance(outcome, BaseException):
                    prefix = f"seed {seed}: " if len(seeds) > 1 else ""
                    attrs["fail_reason"] = f"{prefix}{type(outcome).__name__}: {outcome}"[:1000]
                    attrs["fail_traceback"] = "".join(traceback.format_exception(outcome))[-4000:]
            else:
                ret = returns[0]
                measured = [m for m in (read_metrics(job_dir(r)) for r in returns) if m]
                if measured:
                    keys = [k for k in measured[0] if all(k in m for m in measured)]
                    attrs["metrics"] = {k: mean_over_seeds([m[k] for m in measured]) for k in keys}
                if len(seeds) > 1:  # one seed: the stock loop checks and tells the job's value as it is
                    values = [r.return_value if n_objectives > 1 else [r.return_value] for r in returns]
                    means = [statistics.fmean(float(v[i]) for v in values) for i in range(n_objectives)]
                    ret.return_value = means[0] if n_objectives == 1 else means
                    names = self._objective_names()
                    attrs["seeds"] = seeds
                    attrs["seed_values"] = {n: [float(v[i]) for v in values] for i, n in enumerate(names)}
                    attrs["seed_std"] = {n: statistics.stdev(attrs["seed_values"][n]) for n in names}
            try:
                for key, value in attrs.items():
                    trial.set_user_attr(key, value)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker ended the trial: telling it logs that
            folded.append(ret)
        return folded

    def _objective_names(self) -> list[str]:
        """The objectives by name: lora_lab's optimized_metric, or for another app `objective`
        (`objective_<i>` for several), as the stock sweeper leaves them unnamed."""
        metric = OmegaConf.select(self.config, "optimized_metric", default=None)
        if metric is None:
            n = len(self._get_directions())
            return ["objective"] if n == 1 else [f"objective_{i}" for i in range(n)]
        return [metric] if isinstance(metric, str) else list(metric)

    def _rerun_command(self, trial: optuna.trial.FrozenTrial) -> str:
        """The single run of a trial's configuration: the program, the sweep's fixed overrides and its
        params, but not a trial's own train.seed (a seed is not a setting: a fixed one stays)."""
        params = {
            k: v
            for k, v in {**trial.user_attrs, **trial.params}.items()
            if k not in TRIAL_ATTRS and k != SEED
        }
        fixed = [a for a in self._arguments if "(" not in a and a.split("=")[0] not in params]
        return " ".join([program(), *fixed, *(f"{k.lstrip('+')}={v}" for k, v in params.items())])

    def _winner(self, trials: list[optuna.trial.FrozenTrial]) -> dict[str, Any] | None:
        """Whether the best configuration beats the runner-up beyond noise (lora_lab.stats.compare):
        the configurations are the COMPLETE trials' params less train.seed, each run's value the
        trial's per-seed values (hydra.sweeper.seeds) or its value. None for an app without
        train.seed, whose configurations cannot be repeated with other seeds."""
        if OmegaConf.select(self.config, SEED, default=None) is None:
            return None
        groups: dict[str, list[float]] = {}
        for t in trials:
            if t.state == TrialState.COMPLETE:
                config = ", ".join(f"{k}={v}" for k, v in sorted(t.params.items()) if k != SEED) or "all runs"
                values = t.user_attrs.get("seed_values", {}).get(self._objective_names()[0], [t.value])
                groups.setdefault(config, []).extend(values)
        if len(groups) < 2:
            return None
        best, runner_up = stats.compare(groups, self._get_directions()[0])[:2]
        winner = {
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
            winner["confirmed"] = None
            confirm = CONFIRM.format(target=self.sweep_dir)
            winner["line"] = (
                f"winner unconfirmed: no repeats to measure the noise ({numbers}); confirm with: {confirm}"
            )
        else:
            winner["confirmed"] = runner_up["verdict"] == "worse"
            interval = (
                f"difference {runner_up['diff_vs_best']:.4g}, {stats.CONFIDENCE:.0%} Welch interval "
                f"[{runner_up['diff_ci_low']:.4g}, {runner_up['diff_ci_high']:.4g}]"
            )
            verdict = "confirmed: beats" if winner["confirmed"] else "not confirmed: within noise of"
            winner["line"] = f"winner {verdict} the runner-up ({numbers}; {interval})"
        return winner

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
            summary["best_trial"] = best.number
            summary["best_value"] = best.value
            summary["best_command"] = self._rerun_command(best)
            log.info("rerun the best trial with: %s", summary["best_command"])
            if (winner := self._winner(trials)) is not None:
                summary["winner"] = winner
                log.info("%s", winner["line"])
        elif len(summary["directions"]) > 1 and any(t.state == TrialState.COMPLETE for t in trials):
            summary["pareto_commands"] = [
                {"trial": t.number, "values": list(t.values), "command": self._rerun_command(t)}
                for t in study.best_trials
            ]
            for entry in summary["pareto_commands"]:
                log.info("rerun Pareto-front trial %d with: %s", entry["trial"], entry["command"])
        # Wide lines: a command split over two YAML lines loses its params when copied.
        with open(f"{self.sweep_dir}/study_summary.yaml", "w") as f:
            yaml.safe_dump(summary, f, width=math.inf, sort_keys=False, allow_unicode=True)
