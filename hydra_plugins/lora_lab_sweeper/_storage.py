"""Where a study lives: a SQLite path made absolute, a password kept out of every record, and a study
created or loaded by workers that may start at the same moment."""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import optuna
import sqlalchemy
from omegaconf import open_dict, read_write
from sqlalchemy.engine import make_url

from lora_lab.commands import quote
from lora_lab.errors import ConfigError


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


def password_to_environment(storage: str, hydra: Any) -> str:
    """The storage URL without its password, which moves to PGPASSWORD: in the URL it would be
    copied into every job's overrides and logs, Hydra's .hydra/ files and the W&B run. Jobs
    inherit the environment (every launcher starts them with it) and libpq reads it there.
    `hydra` is the sweep config's hydra node, whose record of the setting gets the masked URL."""
    url = make_url(storage)
    if url.password is None:
        return storage
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
    with read_write(hydra), open_dict(hydra):
        hydra.sweeper.storage = masked
        overrides = hydra.overrides.hydra
        hydra.overrides.hydra = [
            *(o for o in overrides if o.split("=")[0].lstrip("+") != "hydra.sweeper.storage"),
            f"hydra.sweeper.storage={quote(masked)}",
        ]
    sys.argv = [a.replace(storage, masked) for a in sys.argv]  # W&B runs record the command line
    return url._replace(password=None).render_as_string(hide_password=False)  # set() skips None
