"""A minimal worker pool: each task runs once, on whichever worker is free.

Several workers run on helper threads, each with torch set to one thread: a search
worker alternates long sgemm calls with dozens of short, memory-bound selection ops, and
single-threaded workers keep all cores busy (one multiplies while another selects)
without any OpenMP team. Run with torch's intra-op threads instead, every short op is a
parallel region ending in a barrier, and an idle team thread spins after each one; on
the shared 2-core box a barrier cost milliseconds whenever another process wanted a core
(a 345k-key sort: 6 ms -> 190 ms, measured).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

__all__ = ["run_tasks"]

W = TypeVar("W")
T = TypeVar("T")


def run_tasks(workers: Sequence[W], tasks: Sequence[T], run: Callable[[W, T], None],
              bar: Any = None) -> None:
    """Call ``run(worker, task)`` once per task; one worker runs on this thread.

    Tasks are taken in order. The first exception of any worker stops the others after
    their current task and is re-raised here; ``bar`` (a tqdm bar or None) is advanced
    once per finished task. The caller's torch thread count is left as it was.
    """
    if len(workers) == 1:
        for task in tasks:
            run(workers[0], task)
            if bar is not None:
                bar.update(1)
        return
    lock = threading.Lock()
    pending = list(reversed(tasks))
    errors: list[BaseException] = []

    def loop(worker: W) -> None:
        # Sets this thread's OpenMP / MKL thread count; the process-wide default it
        # also sets is put back on the way out.
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                while True:
                    with lock:
                        if not pending or errors:
                            return
                        task = pending.pop()
                    run(worker, task)
                    if bar is not None:
                        with lock:
                            bar.update(1)
        except BaseException as exc:  # re-raised on the caller's thread
            with lock:
                errors.append(exc)
        finally:
            torch.set_num_threads(previous)

    threads = [threading.Thread(target=loop, args=(w,), name=f"aoq-search-{i}", daemon=True)
               for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException as exc:  # e.g. KeyboardInterrupt: let the workers stop too
        with lock:
            errors.append(exc)
        raise
    if errors:
        raise errors[0]
