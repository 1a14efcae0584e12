"""What makes a study's trials comparable, recorded in a new study and checked on a resume, and the lock
that keeps two sweeps out of one sweep dir."""

from __future__ import annotations

import fcntl
import hashlib
import os
from typing import Any

import optuna
from omegaconf import OmegaConf

from lora_lab.errors import ConfigError

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
    """Lock the sweep dir (until the returned descriptor is closed, or the process ends), so that two
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
