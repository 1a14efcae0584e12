"""What the upstream hydra-optuna-sweeper tests need to run in lora_lab's suite (../README.md): the
test modules here import the fixture, so it applies to those modules alone.

Not a conftest.py: this dir goes first on sys.path in each worker (pytest's prepend import mode), and
a second conftest module there would shadow tests/conftest.py for `from conftest import ...`, in the
worker and in the processes it starts."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

# The plugin root: the folder holding example/ and tests/, as plugins/hydra_optuna_sweeper/ upstream.
PLUGIN_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_plugin_root(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[None]:
    """Upstream calls chdir_plugin_root() at import: a process-wide chdir, into the dir of the
    nearest setup.py above the cwd, that would also move every test module sharing the worker.
    Each test here runs in the plugin root instead (the example tests run example/... from it), and
    the cwd is restored after it. A hydra_sweep_runner test runs in its own tmp_path: the runner
    sweeps into `None` relative to the cwd, one dir for all of them, which the lora_lab_optuna
    sweeper locks while a sweep runs, so two xdist workers there would collide.

    The hydra_sweep_runner tests sweep in this process, and the lora_lab_optuna sweeper leaves
    process-wide state behind (SIGINT/SIGTERM handlers that raise its Interrupted, Optuna's log
    level), as a command line's sweep may: restored after each test, for the other tests of the
    worker."""
    import optuna

    monkeypatch.chdir(tmp_path if "hydra_sweep_runner" in request.fixturenames else PLUGIN_ROOT)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    verbosity = optuna.logging.get_verbosity()
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    optuna.logging.set_verbosity(verbosity)
