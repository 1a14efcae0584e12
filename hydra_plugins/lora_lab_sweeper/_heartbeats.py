"""A trial lives while the worker that will tell its outcome does: each trial's heartbeat in the
storage from ask to tell, and RUNNING trials whose heartbeat went stale (their worker was killed or
lost the database) marked FAIL."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread

log = logging.getLogger(__name__)


class Heartbeats:
    """The heartbeat threads of the trials this worker will tell, by trial number. A heartbeat runs
    across a job's queueing and the wait for the rest of a parallel batch."""

    def __init__(self) -> None:
        self._threads: dict[int, Any] = {}

    def start(self, trials: list, study: optuna.Study) -> None:
        for trial in trials:
            heartbeat = get_heartbeat_thread(trial._trial_id, study._storage)
            heartbeat.start()
            self._threads[trial.number] = heartbeat

    def end(self, number: int) -> None:
        if (heartbeat := self._threads.pop(number, None)) is not None:
            heartbeat.join()

    def end_all(self) -> None:
        """The threads an error left running: each would hang the process's exit."""
        for number in list(self._threads):
            self.end(number)


def fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():  # fail_stale_trials is experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def stale_trial_logger(grace_period: int) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """The storage's callback for each trial it marks FAIL for a stale heartbeat."""

    def log_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning(
            "trial %d had no heartbeat for over %d s (its worker was killed or lost the database): "
            "marked FAIL",
            trial.number,
            grace_period,
        )

    return log_stale_trial
