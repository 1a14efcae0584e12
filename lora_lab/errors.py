"""The one error type of bad user input, and how the command-line tools end on it."""

from __future__ import annotations

import contextlib
import sys
from typing import Any


class ConfigError(ValueError):
    """A bad value in the user's config: the message is one line meant for the user."""

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"{key}={value!r} is invalid: {valid}")


@contextlib.contextmanager
def exit_on_config_error():
    """For the command-line tools: a ConfigError ends the command with its one line and exit
    status 2, without a traceback."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
