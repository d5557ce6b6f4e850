"""Shared fixtures: real local Ray instances, and small end-to-end training runs."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import aoq.models  # noqa: F401 - registers the model names that config validation checks
from aoq.cluster.job import LOCAL_RAY_ENV, TrainingOutcome, run_training
from aoq.config import Config, load_config

# Ray Train's controller polls its workers every 2 s by default, so every small job here
# would wait up to 2 s after its last report, and again at each phase; the tests run
# about fifty jobs. Set before any Ray instance starts, so every Ray process (and every
# driver subprocess) inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# The tests' local Ray instances run with the settings the driver gives a local Ray it
# starts (no preemption watcher: one process fewer per job).
for _key, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_key, _value)

# Small enough to train in seconds on 2 cores, big enough for every code path
# (two DDP ranks with several steps each, mining with K < n, 1K-style evaluation).
# One mining actor (in 2 shards): every actor is a process importing torch, and the
# tests of several actors ask for them (test_async_refresh_e2e.py, test_multinode.py).
SMALL_SCENES = [
    "data.scenes.n_train=240", "data.scenes.n_dev=40", "data.scenes.n_test=100",
    "data.scenes.feature_dim=32", "data.scenes.n_regions=12",
    "model.embed_dim=32", "model.word_dim=16",
    "optim.batch_size=32", "data.dev_max_images=40",
    "negatives.k_captions=100", "negatives.k_images=40", "negatives.sampling_range=50",
    "negatives.pool_actors=1",
]


@pytest.fixture(scope="session")
def scenes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scenes cache for the session, so small datasets are generated once."""
    return tmp_path_factory.mktemp("scenes-cache")


def small_overrides(tmp: Path, cache: Path, *extra: str) -> list[str]:
    return [*SMALL_SCENES, f"data.cache_dir={cache}", f"run.storage={tmp / 'runs'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


@functools.cache
def _empty_store() -> Path:
    """An empty MLflow store, created once per test process by MLflow itself."""
    path = Path(tempfile.mkdtemp(prefix="aoq-store-template-")) / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


def seed_store(tmp: Path) -> None:
    """Give ``tmp/mlflow.db`` the tables of an empty MLflow store before a job records there.

    MLflow creates a new SQLite store by running its whole chain of schema migrations,
    about 2.6 CPU seconds on the 2-core box, and the suite runs dozens of jobs, each in
    a store of its own. The copy is the store a first job would create; the tests of
    creating a store (a fresh one written by several jobs at once, refusals that must
    leave none behind) never call this."""
    target = tmp / "mlflow.db"
    if not target.exists():
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), target)


def store_client(tmp: Path) -> MlflowClient:
    """A client of the MLflow store a small job under ``tmp`` records into."""
    return MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")


@dataclass(frozen=True)
class SmallRun:
    """A finished small training job, and the MLflow store it was recorded in."""

    tmp: Path
    cfg: Config
    outcome: TrainingOutcome

    @property
    def client(self) -> MlflowClient:
        return store_client(self.tmp)

    @property
    def run(self):
        return self.client.get_run(self.outcome.run_id)

    @property
    def output_dir(self) -> Path:
        return Path(self.outcome.output_dir)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric, by step."""
        return sorted((m.step, m.value)
                      for m in self.client.get_metric_history(self.outcome.run_id, key))


def small_config(tmp: Path, cache: Path, *extra: str) -> Config:
    """The small scenes config with outputs and the MLflow store under ``tmp``."""
    return load_config(None, small_overrides(tmp, cache, *extra))


def train_small(tmp: Path, cache: Path, *extra: str) -> SmallRun:
    """Train :func:`small_config` to the end on the Ray instance this process has."""
    cfg = small_config(tmp, cache, *extra)
    seed_store(tmp)
    return SmallRun(tmp, cfg, run_training(cfg))


#: Whether the Ray instance this process runs is the shared one.
_SHARED_RAY = {"running": False}


def start_ray(**kwargs) -> None:
    """Stop any Ray instance this process runs and start a private local one (never one
    that happens to run on the machine: ``address="local"``, and RAY_ADDRESS dropped)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _SHARED_RAY["running"] = False
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(**{"address": "local", "num_cpus": 2, "logging_level": "WARNING",
                "include_dashboard": True, **kwargs})


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """The Ray instance shared by the end-to-end modules that kill no process: started
    on first use and kept for the next module (starting one costs seconds)."""
    import ray

    if not (_SHARED_RAY["running"] and ray.is_initialized()):
        start_ray()
        _SHARED_RAY["running"] = True
    yield


@pytest.fixture(scope="module")
def private_ray() -> Iterator[None]:
    """A fresh Ray instance for a module that SIGKILLs Ray processes (workers, actors):
    whatever it breaks goes away with it."""
    import ray

    start_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def no_ray() -> Iterator[None]:
    """No Ray instance in this process: for tests that show a job stops before Ray starts."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _SHARED_RAY["running"] = False
    yield


#: Fixtures that start a Ray instance of their own. Within each weight of :func:`_order`
#: their modules run after the ones sharing ``local_ray``, so the shared instance is
#: restarted as rarely as the order of long modules first allows.
OWN_RAY_FIXTURES = {"private_ray", "ray_with_s3", "cluster"}


def _ray_order(item: pytest.Item) -> int:
    names = set(item.fixturenames)
    if "no_ray" in names:
        return 0
    return 2 if OWN_RAY_FIXTURES & names else 1


def _order(item: pytest.Item) -> tuple[int, int]:
    """Modules marked ``long`` first, then the other end-to-end ones: the suite runs in
    two processes, each taking the next whole module as it frees up, so the long modules
    start early and the many short ones fill the end on both processes (a long module
    started last would run alone). xdist keeps this order only with
    ``--no-loadscope-reorder`` (pyproject.toml): by default it hands out the modules with
    the most tests first."""
    weight = 0 if item.get_closest_marker("long") else 1 if item.get_closest_marker("e2e") else 2
    return (weight, _ray_order(item))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_order)


def pytest_sessionfinish(session: pytest.Session) -> None:  # noqa: ARG001 - hook signature
    import sys

    if _empty_store.cache_info().currsize:
        shutil.rmtree(_empty_store().parent, ignore_errors=True)

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
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


def joining_env() -> dict[str, str]:
    """The environment for a driver subprocess that joins the Ray instance this process
    runs, as a job does on a running cluster (``RAY_ADDRESS``), instead of starting its
    own: for tests of what a driver does with its job (kill it, resubmit it), where a
    private Ray per driver would only add its start-up, seconds of CPU each time. The
    driver's actors, Ray Train's and Tune's included, die with it as they would with
    its own Ray; the tests of a driver's own local Ray use :func:`driver_env`."""
    import ray

    assert ray.is_initialized(), "joining_env needs a Ray fixture (local_ray, private_ray)"
    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def signal_driver_when(command: list[str], ready: Callable[[], bool], signum: int, *,
                       log: Path, cwd: Path, timeout: float = 600,
                       env: dict[str, str] | None = None) -> int:
    """Start a driver process (in ``env``, default :func:`driver_env`), send it
    ``signum`` once ``ready()``, and return its exit code (a process left running is
    SIGKILLed: the test stops what it started)."""
    with open(log, "w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env=driver_env() if env is None else env, cwd=cwd)
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
