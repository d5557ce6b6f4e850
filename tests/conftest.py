"""Shared fixtures: a real local Ray instance, and small configs for end-to-end runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

import aoq.models  # noqa: F401 - registers the model names that config validation checks

# Small enough to train in seconds on 2 cores, big enough for every code path
# (two DDP ranks with several steps each, mining with K < n, 1K-style evaluation).
SMALL_SCENES = [
    "data.scenes.n_train=240", "data.scenes.n_dev=40", "data.scenes.n_test=100",
    "data.scenes.feature_dim=32", "data.scenes.n_regions=12",
    "model.embed_dim=32", "model.word_dim=16",
    "optim.batch_size=32", "data.dev_max_images=40",
    "negatives.k_captions=100", "negatives.k_images=40", "negatives.sampling_range=50",
]


@pytest.fixture(scope="session")
def scenes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scenes cache for the session, so small datasets are generated once."""
    return tmp_path_factory.mktemp("scenes-cache")


def small_overrides(tmp: Path, cache: Path, *extra: str) -> list[str]:
    return [*SMALL_SCENES, f"data.cache_dir={cache}", f"run.storage={tmp / 'runs'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private local Ray instance (never attaches to a cluster that happens to run)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, logging_level="WARNING",
             include_dashboard=True)
    yield
    ray.shutdown()


# ----------------------------------------------------------------------------- fault injection


def used_versions(run_dir: Path, rank: int) -> list[dict[str, int]]:
    """The (epoch, table version, pid) lines a rank appends at every epoch start."""
    path = run_dir / "negatives" / f"used_rank{rank}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def in_background(action: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run ``action(stop)`` in a thread while the body runs; then set ``stop`` and join."""
    stop = threading.Event()
    thread = threading.Thread(target=action, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def killing(pids: Callable[[], Iterable[int]], *, once: bool = True) -> Iterator[list[int]]:
    """While the body runs, SIGKILL each new pid that ``pids()`` returns (polled every
    50 ms): the first one only, or every one with ``once=False``. Yields the killed pids."""
    killed: list[int] = []

    def loop(stop: threading.Event) -> None:
        while not stop.is_set():
            for pid in pids():
                if pid not in killed:
                    killed.append(pid)
                    os.kill(pid, signal.SIGKILL)
                    if once:
                        return
            time.sleep(0.05)

    with in_background(loop):
        yield killed


def driver_env() -> dict[str, str]:
    """The test's environment for a driver subprocess that starts its own local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def signal_driver_when(command: list[str], ready: Callable[[], bool], signum: int, *,
                       log: Path, cwd: Path, timeout: float = 600) -> int:
    """Start a driver process, send it ``signum`` once ``ready()``, and return its exit
    code (a process left running is SIGKILLed: the test stops what it started)."""
    with open(log, "w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env=driver_env(), cwd=cwd)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert driver.poll() is None, \
                    f"driver exited ({driver.returncode}) early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "timed out waiting to signal the driver"
                time.sleep(0.05)
            os.kill(driver.pid, signum)
            return driver.wait(timeout=300)  # a hang guard, not a timing assertion
        finally:
            if driver.poll() is None:
                os.kill(driver.pid, signal.SIGKILL)
                driver.wait()


def wait_gone(pids: Iterable[int], timeout: float = 120) -> None:
    """Wait until none of ``pids`` is alive (Linux /proc); fail after ``timeout``."""
    pids = set(pids)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"processes {sorted(pids)} are still alive"
        time.sleep(0.2)
