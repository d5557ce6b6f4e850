"""SIGTERM and Ctrl-C (SIGINT) on a job's driver: stop, and record the run as KILLED.

Two things stand between a signal and a correct record. ``ray.get`` replaces an
exception raised by a signal handler with its own ``SystemExit(1)``, so the exception
type that reaches the driver cannot tell a signal from a failure. And while a
``TorchTrainer`` runs, Ray Train installs its own SIGINT handler (it aborts the run and
exits), so a handler of ours never sees Ctrl-C at all. :func:`stop_signals` therefore
also listens on Python's signal wake-up file descriptor, which receives the number of
every signal delivered to a Python-level handler, whoever's it is; the driver asks
:meth:`StopSignals.received` after a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

#: The signals that stop a driver, and the exit code each ends it with (128 + signum).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Terminated(SystemExit):
    """The driver got SIGTERM (``ray job stop``, a scheduler, ``kill``): the run is
    marked KILLED and the process exits with 128 + 15, without a traceback."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class Interrupted(SystemExit):
    """The driver got Ctrl-C (SIGINT): the run is marked KILLED and the process exits
    with 128 + 2, without a traceback."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGINT)


def stopped_by(signum: int) -> SystemExit:
    """The exception that ends a driver stopped by ``signum``."""
    return Interrupted() if signum == signal.SIGINT else Terminated()


def signal_label(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"


class StopSignals:
    """Which stop signal, if any, reached this process while :func:`stop_signals` ran."""

    def __init__(self, wakeup_fd: int | None) -> None:
        self._fd = wakeup_fd
        self._signum: int | None = None

    def note(self, signum: int) -> None:
        self._signum = self._signum or signum

    def received(self) -> int | None:
        """The first stop signal received (SIGTERM or SIGINT), or None."""
        if self._signum is None and self._fd is not None:
            try:
                delivered = os.read(self._fd, 4096)
            except (BlockingIOError, OSError):
                delivered = b""
            for number in delivered:
                if number in STOP_SIGNALS:
                    self.note(number)
                    break
        return self._signum


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Turn SIGTERM into :class:`Terminated` and SIGINT into :class:`Interrupted` while
    the body runs, and remember either even when another handler took it.

    Main thread only (Python delivers signals there); elsewhere (a Tune trial's thread)
    nothing is installed and :meth:`StopSignals.received` stays None.
    """
    if threading.current_thread() is not threading.main_thread():
        yield StopSignals(None)
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    state = StopSignals(read_fd)

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        state.note(signum)
        raise stopped_by(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield state
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, old in previous.items():
            signal.signal(signum, old)
        os.close(read_fd)
        os.close(write_fd)
