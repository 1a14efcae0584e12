"""The hydra-optuna-sweeper, extended for training sweeps (select with `hydra/sweeper=lora_lab_optuna`).

What it adds to the stock plugin, without replacing its sweep loop:
- each job gets `optuna_trial.{study_name,storage,trial_id,number}`, so the training loop can report
  to its own trial and ask the pruner (`hydra.sweeper.pruner`, any `optuna.pruners.*`);
- a job that raised `optuna.TrialPruned` ends PRUNED, a job that raised anything else ends FAIL with
  the reason in the trial's user attrs, and the sweep goes on (max_failure_rate defaults to 1.0);
- a SQLite storage path is made absolute and its directory created; job dirs are numbered by trial;
- a new study records what makes its trials comparable: objectives and directions, the sweep's fixed
  overrides, the data files (absolute path, content hash); resuming it with other settings is
  refused in one line naming each difference (exit 2), so trials of two sweeps are never mixed;
- resuming a grid runs each point without a COMPLETE or PRUNED trial once (failed points again),
  and a complete grid runs nothing;
- the sweep dir is locked while the sweep runs: a second sweep started into it is refused (exit 2);
- a sweep whose trials all ended neither COMPLETE nor PRUNED exits 1, with their states in one line;
- each trial keeps a heartbeat in the storage from ask to tell, written by the worker that will
  tell it; at start-up and before each batch, RUNNING trials whose heartbeat is older than
  `grace_period` (their worker was killed or lost the database) are marked FAIL, so workers on one
  study never fail each other's live trials; a trial another worker ended meanwhile is logged, not told;
- a password in the storage URL reaches the jobs as PGPASSWORD (libpq reads it): no override,
  config, log or summary holds it (Hydra's record of the setting shows it masked, user:***@host);
- at the end, besides the stock `optimization_results.yaml`, `study_summary.yaml` holds the trial
  counts per state and the override line that reruns the best trial as a single run.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf, open_dict, read_write
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from lora_lab.config import ConfigError

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
DATA_FILE_KEYS = ("task.train_path", "task.eval_path")


def study_identity(
    config: Any, directions: list[str], fixed_params: dict[str, Any], deletions: list[str]
) -> dict[str, str]:
    """What makes a study's trials comparable, key by key: the objectives and their directions, the
    sweep's fixed overrides (not its swept params), and each data file as an absolute path with a
    hash of its content, since the same path may hold other rows by the next sweep."""
    identity = {key: str(value) for key, value in fixed_params.items()}
    identity |= dict.fromkeys(deletions, "deleted")
    metric = config.optimized_metric
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


class _OutcomeLauncher:
    """Wraps the real launcher to read each job's outcome before the stock loop tells Optuna."""

    def __init__(self, launcher: Any, sweeper: LoraLabSweeperImpl):
        self.launcher, self.sweeper = launcher, sweeper

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        self.sweeper.record_outcomes(returns)
        return returns


class LoraLabSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *args: Any, heartbeat_interval: int, grace_period: int):
        super().__init__(*args)
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
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
        self._arguments = list(arguments)
        distributions, fixed_params, deletions = self._split_overrides(arguments)
        identity = study_identity(self.config, self._get_directions(), fixed_params, deletions)
        try:
            study = self._open_study()
            check_identity(study, identity)
            self._dir_lock = claim_dir(self.sweep_dir)  # held until the process ends
        except ConfigError as e:
            log.error("%s", e)
            sys.exit(2)
        existing = study.get_trials(deepcopy=False)
        self._heartbeat_study = study
        self._fail_stale_trials()
        if existing:
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
        finally:
            for heartbeat in self._heartbeats.values():  # left by an error: its thread would hang the exit
                heartbeat.join()
        if self._study is None:  # no trial ran (a complete grid): summarise the study as it is
            self._study = study
        self._write_summary()
        self._exit_if_no_trial_completed()

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
                return tell(trial, values=values, state=state, **kwargs)
            except (RuntimeError, ValueError) as e:
                # GridSampler calls study.stop() once the grid is done, which raises outside
                # optimize(); the trial's state is stored before that. The stock loop ignores
                # this for COMPLETE trials only, so a failing last grid point crashed the sweep.
                if "Study.stop" in str(e):
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
                try:
                    trial.set_user_attr("fail_reason", f"{type(outcome).__name__}: {outcome}"[:1000])
                    trial.set_user_attr(
                        "fail_traceback", "".join(traceback.format_exception(outcome))[-4000:]
                    )
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # another worker ended the trial: telling it logs that

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
    def __init__(self, heartbeat_interval: int, grace_period: int, pruner: Any = None, **kwargs: Any):
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
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )


@dataclass
class LoraLabOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.lora_lab_sweeper.lora_lab_sweeper.LoraLabOptunaSweeper"
    # e.g. {_target_: optuna.pruners.MedianPruner, n_startup_trials: 2}; null: no pruning
    pruner: Any = None
    # Seconds between the heartbeats a worker writes for each trial it runs, and how old the last
    # one may be before any worker marks the trial FAIL (its worker was killed or lost the
    # database). Every worker on one study needs the same values.
    heartbeat_interval: int = 60
    grace_period: int = 600
    max_failure_rate: float = 1.0  # a failing trial fails alone, never the sweep
    n_jobs: int = 1  # trials per batch; they run in parallel only under a parallel launcher (joblib)


ConfigStore.instance().store(
    group="hydra/sweeper", name="lora_lab_optuna", node=LoraLabOptunaSweeperConf, provider="lora_lab"
)
