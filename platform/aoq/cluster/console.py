"""What of Ray's own output reaches the console.

Ray streams every worker's and actor's output to the driver's console. Besides aoq's
own lines (progress, epochs, warnings, errors) that includes Ray's internal chatter:
C++ log lines (``[... E 123 456] core_worker.cc:2465: ...``), warnings of Ray's Python
loggers, tracebacks Ray prints about its own internals, and stack dumps of workers it
shuts down. Read by a newcomer they look like failures. By default they are dropped
from the console; Ray has already written them to its log files
(``/tmp/ray/session_latest/logs/``), and the driver's own Ray warnings are written
there too (``aoq-driver-<pid>.log``). ``--verbose`` (``AOQ_VERBOSE=1``) shows them all.

A traceback is dropped only when none of its frames is aoq code: an error raised in
aoq always shows. Serve's request and deployment logs go to Ray's files only
(``RAY_SERVE_LOG_TO_STDERR=0``) unless verbose.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

VERBOSE_ENV = "AOQ_VERBOSE"
#: Name under which Ray's driver registers its printer of worker output.
RAY_PRINTER = "ray_print_logs"

# Ray's C++ (glog) lines: "[2026-12-02 10:55:05,919 E 10225 10269] core_worker.cc:2465: ..."
_CPP_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+:\d+: ")
# Ray's Python loggers: "2026-12-02 10:54:54,918\tWARNING worker.py:85 -- ..."
_RAY_PY_WARNING = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(WARNING|ERROR|CRITICAL) "
                             r"\S+\.py:\d+ -- ")
# A worker's fatal-signal dump on shutdown: "*** SIGTERM received at time=...", "PC: @ ..."
_SIGNAL_DUMP = re.compile(r"^(\*\*\* SIG[A-Z]+ received|PC: @ |\s+@ +0x)")
_TRACEBACK_START = "Traceback (most recent call last):"
# Python's header of an exception that ended a thread, printed just before its traceback.
_THREAD_HEADER = re.compile(r"^Exception in thread \S.*:$")
_TRACEBACK_LINKS = ("During handling of the above exception",
                    "The above exception was the direct cause")
# The raylet's notice that a task of a dead actor will be retried (Ray's own retry logic).
_RETRY_NOTICE = re.compile(r"^Task \S+ failed\. There are (infinite|\d+) retries remaining")
# A frame of aoq code: the package (installed or platform/aoq) or a job script.
_AOQ_FRAME = re.compile(r'File ".*(/aoq/|/jobs/)[^"]*\.py"')


def set_verbose(on: bool) -> None:
    """Show (True) or hide (False) Ray's own output, in this process and in every
    process it starts (Ray workers inherit the environment)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") == "1"


def is_ray_internal(line: str) -> bool:
    """Whether one line (outside a traceback) is Ray's own chatter."""
    return bool(_CPP_LOG.match(line) or _RAY_PY_WARNING.match(line)
                or _SIGNAL_DUMP.match(line) or _RETRY_NOTICE.match(line))


def _continues_traceback(line: str) -> bool:
    """A frame, source line, blank line or chaining note: the traceback goes on."""
    return (not line.strip() or line[:1].isspace()
            or line.startswith((_TRACEBACK_START, *_TRACEBACK_LINKS)))


class ConsoleFilter:
    """Filters streamed output line by line, per source.

    A traceback is held back until its exception line, then shown whole if one of its
    frames is aoq code and dropped whole otherwise; the lines that follow it (an indented
    continuation of the message, chaining notes) share that fate.
    """

    def __init__(self) -> None:
        self._pending: dict[Any, list[str]] = {}
        self._after: dict[Any, bool] = {}  # source -> was its last traceback shown
        self._chained: set[Any] = set()  # sources whose pending traceback continues one shown

    def _start(self, key: Any, line: str) -> None:
        self._after.pop(key, None)
        self._pending[key] = [line]

    def _feed(self, key: Any, line: str) -> list[str]:
        block = self._pending.get(key)
        if block is not None:
            if len(block) == 1 and _THREAD_HEADER.match(block[0]) and \
                    not line.startswith(_TRACEBACK_START):
                # A line that only looked like a thread's exception header.
                return [self._pending.pop(key)[0], *self._feed(key, line)]
            block.append(line)
            if _continues_traceback(line):
                return []
            del self._pending[key]  # the exception line ends the traceback
            shown = key in self._chained or any(_AOQ_FRAME.search(b) for b in block)
            self._chained.discard(key)
            self._after[key] = shown
            return block if shown else []
        if line.startswith(_TRACEBACK_START) or _THREAD_HEADER.match(line):
            self._start(key, line)
            return []
        if key in self._after and _continues_traceback(line):
            if self._after[key] and line.startswith(_TRACEBACK_LINKS):
                self._chained.add(key)  # the next traceback is part of the one shown
            return [line] if self._after[key] else []
        self._after.pop(key, None)
        return [] if is_ray_internal(line) else [line]

    def lines(self, key: Any, lines: Iterable[str]) -> list[str]:
        """The lines of ``lines`` (from source ``key``) that reach the console now."""
        out: list[str] = []
        for line in lines:
            out += self._feed(key, line)
        return out


def filtered_printer(printer: Callable[[dict], None], console: ConsoleFilter
                     ) -> Callable[[dict], None]:
    """Wrap Ray's printer of a batch of worker output (a dict with ``lines``)."""

    def print_batch(batch: dict) -> None:
        key = (batch.get("pid"), batch.get("is_err"))
        kept = console.lines(key, batch.get("lines", []))
        if kept:
            printer({**batch, "lines": kept})

    return print_batch


class _DriverRayLog(logging.Handler):
    """The driver's own Ray warnings, written to Ray's session log directory once it is
    known (they are emitted during ``ray.init``, before it exists)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.pending: list[str] = []
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.pending.append(self.format(record))
        if self.path is not None:
            self._flush()

    def attach(self, logs_dir: Path) -> None:
        self.path = logs_dir / f"aoq-driver-{os.getpid()}.log"
        if self.pending:
            self._flush()

    def _flush(self) -> None:
        assert self.path is not None
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(line + "\n" for line in self.pending)
        self.pending = []


_DRIVER_LOG = _DriverRayLog()


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def before_ray_init() -> None:
    """Unless verbose: keep the driver's Ray warnings and Serve's logs off the console."""
    if is_verbose():
        return
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    ray_logger = logging.getLogger("ray")
    for handler in ray_logger.handlers:
        if _errors_only not in handler.filters:
            handler.addFilter(_errors_only)
    if _DRIVER_LOG not in ray_logger.handlers:
        ray_logger.addHandler(_DRIVER_LOG)


def after_ray_init() -> None:
    """Unless verbose: filter the worker output Ray prints (see the module docstring)."""
    if is_verbose():
        return
    import ray._private.worker as ray_worker  # Ray's printer registry has no public API

    node = getattr(ray_worker, "_global_node", None)
    if node is not None:
        _DRIVER_LOG.attach(Path(node.get_logs_dir_path()))
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    handlers = dict(getattr(dispatcher, "handlers", []))
    printer = handlers.get(RAY_PRINTER)
    if printer is None or getattr(printer, "aoq_filtered", False):
        return  # not printing worker output, already filtered, or another Ray layout
    wrapped = filtered_printer(printer, ConsoleFilter())
    wrapped.aoq_filtered = True  # type: ignore[attr-defined]
    dispatcher.remove_handler(RAY_PRINTER)
    dispatcher.add_handler(RAY_PRINTER, wrapped)
