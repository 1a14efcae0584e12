"""`python -m <module> args` in a process of its own, without paying for its imports every time.

On the 2-core test machine a `python -m lora_lab.train` spends about 20 s importing torch,
transformers, PEFT and bitsandbytes before its first step, while a test sweep's trial trains in 2-3 s:
the CLI tests spent most of the suite's time on imports. Python's multiprocessing forkserver imports
them once per test worker, and each run is a new process forked from it, running the module as
`python -m` does (runpy): its own pid, exit status, signals, process group, working directory,
environment and output files. A fork is not a fresh interpreter in two ways: what a library read from
the environment when it was imported keeps the test suite's values (conftest: offline, one torch
thread per worker), and warnings printed during import are not printed again. A test that checks
either runs a fresh interpreter (`conftest.cli(..., fresh=True)`).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

# What `python -m lora_lab.<command>` imports before it trains or sweeps; the rest is imported lazily,
# as in a fresh process.
PRELOAD = ["lora_lab.train", "lora_lab.pipeline", "hydra_plugins.lora_lab_sweeper._impl"]

# Also for tests' own worker processes (multiprocessing.Process): forked as cheaply.
context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(PRELOAD)


def _exit_status(code) -> int:
    """The exit status of `raise SystemExit(code)`, as the interpreter gives it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _main(module, args, cwd, env, stdout_path, stderr_path, new_session) -> None:
    """The forked child: becomes `python -m module args` and exits as that process would."""
    if new_session:
        os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path.insert(0, cwd)  # as `python -m` puts the working directory first
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = [module, *args]
    status = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        status = _exit_status(e.code)
    except KeyboardInterrupt:  # the interpreter ends by SIGINT, as if it were not handled
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        status = 1
    # What the interpreter does before it exits: wait for threads and run their exit hooks (joblib's
    # loky workers end there), then the atexit functions.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class CliProcess:
    """A started command, with the parts of subprocess.Popen the tests use."""

    def __init__(self, args: list[str], cwd: Path, env: dict, stdout: Path, stderr: Path, new_session: bool):
        assert args[0] == "-m", f"only `python -m <module>` runs forked, not {args}"
        for path in {stdout, stderr}:
            Path(path).write_text("")
        self.stdout_path, self.stderr_path = Path(stdout), Path(stderr)
        self._process = context.Process(
            target=_main,
            args=(args[1], args[2:], str(cwd), env, str(stdout), str(stderr), new_session),
        )
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise subprocess.TimeoutExpired(self._process.name, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def output(self) -> str:
        """stdout, and stderr where it is another file."""
        text = self.stdout_path.read_text()
        return text if self.stderr_path == self.stdout_path else text + self.stderr_path.read_text()
