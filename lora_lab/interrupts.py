"""Ctrl-C (SIGINT) and SIGTERM (what Slurm and most schedulers send) end a run or a sweep with one
line and the shell's status for the signal (130, 143), not a traceback."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Interrupted(BaseException):
    """Raised by the signal handlers. A BaseException, like KeyboardInterrupt: the `except Exception`
    of Hydra's job runner, the Trainer and the sweep loop let it through to the command line."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum


def raise_on_interrupt() -> None:
    """From now on SIGINT and SIGTERM raise Interrupted in the main thread."""

    def handler(signum, frame):
        raise Interrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_raised() -> Iterator[None]:
    """raise_on_interrupt() for the block, the handlers found before it restored after it: a sweep
    that runs inside an app's process (twice, say) leaves that process as it found it."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    raise_on_interrupt()
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
