"""The tracking store under faults, and run status when a driver dies (scenarios 9, 10,
and principles 4 and 5 of the second reliability round: a fresh store created by several
processes at once; Ctrl-C recorded as KILLED).

Real MLflow stores (SQLite files), a real closed TCP port, real driver processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from aoq.cluster.tracking import (
    DRIVER_TAG, RUN_NAME_TAG, TrackingError, check_store, driver_identity, start_run,
)
from aoq.config import load_config

from conftest import (
    driver_env, seed_store, signal_driver_when, small_overrides, store_client, used_versions,
    wait_gone,
)

pytestmark = pytest.mark.long  # three drivers, each starting its own Ray

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` unwritable even for root (immutable flag), or by mode otherwise."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("running as root without the right to set the immutable flag")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(mode)


# ----------------------------------------------------------------------------- scenario 9


def test_an_unreachable_server_is_a_clear_error_before_ray_starts(tmp_path: Path,
                                                                   scenes_cache: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    overrides = small_overrides(tmp_path, scenes_cache, "loss.variant=triplet",
                                f"tracking.uri={uri}", "run.name=offline")
    # The timeout is a hang guard, not a timing assertion.
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), *overrides],
                          capture_output=True, text=True, env=driver_env(), cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: tracking.uri='{uri}': the tracking server is unreachable" in proc.stderr
    assert "Connection refused" in proc.stderr and "Traceback" not in proc.stderr
    run_dir = tmp_path / "runs" / "offline"
    # Ray Train never started: it leaves a storage marker and checkpoints when it does.
    assert not (run_dir / ".validate_storage_marker").exists()
    assert not list(run_dir.glob("checkpoint_*"))


def test_a_read_only_store_is_a_clear_error(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_store(uri, "aoq")  # creates it
    with read_only(tmp_path / "mlflow.db"):
        with pytest.raises(TrackingError, match=r"the store is read-only \(store file .*"
                                                r"mlflow.db is not writable\)"):
            check_store(uri, "aoq")
    with pytest.raises(TrackingError, match="does not exist"):
        check_store(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}", "aoq")


WRITER = textwrap.dedent("""
    import sys
    from aoq.cluster.tracking import RunHandle, log_metrics
    uri, run_id, experiment_id, prefix = sys.argv[1:5]
    handle = RunHandle(uri, run_id, experiment_id)
    for step in range(40):
        log_metrics(handle, {f"{prefix}/{k}": step + k / 100 for k in range(25)}, step=step)
""")


def test_concurrent_writers_to_one_store_lose_no_metrics(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = check_store(uri, "aoq")  # created once, by the driver
    client = MlflowClient(uri)
    shared, other = (client.create_run(experiment_id).info.run_id for _ in range(2))
    writers = [(shared, "a"), (shared, "b"), (other, "c")]  # two into one run, as rank 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}  # and a driver do
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, run_id, experiment_id,
                               prefix], env=env, stderr=subprocess.PIPE, text=True)
             for run_id, prefix in writers]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    for run_id, prefix in writers:
        for k in range(25):
            points = client.get_metric_history(run_id, f"{prefix}/{k}")
            assert sorted((m.step, m.value) for m in points) == [
                (step, step + k / 100) for step in range(40)]


CREATOR = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import aoq.models  # registers the model names config validation checks
    from aoq.config import load_config
    from aoq.cluster.tracking import check_store, start_run, end_run
    uri, start, name = sys.argv[1:4]
    Path(f"{start}.{name}").touch()  # imported: at the starting line
    while not Path(start).exists():
        time.sleep(0.002)
    cfg = load_config(None, [f"tracking.uri={uri}", f"run.storage={Path(start).parent}"])
    check_store(uri, "aoq")
    end_run(start_run(cfg, name, {}, resume=True), "FINISHED")
""")


def test_a_fresh_store_created_by_several_jobs_at_once_loses_nothing(tmp_path: Path) -> None:
    """Before: one of two jobs died with 'duplicate column name: step' in MLflow's schema
    migration. Three real processes open the same fresh store at the same moment, each
    as a job's driver does (check the store, then create its run)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = tmp_path / "start"
    names = [f"job{i}" for i in range(3)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    procs = [subprocess.Popen([sys.executable, "-c", CREATOR, uri, str(start), name],
                              env=env, stderr=subprocess.PIPE, text=True) for name in names]
    try:
        while not all(Path(f"{start}.{name}").exists() for name in names):
            assert all(p.poll() is None for p in procs), "a creator exited early"
            time.sleep(0.01)
        start.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=600)  # a hang guard, not a timing assertion
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("aoq").experiment_id])
    assert sorted(r.data.tags[RUN_NAME_TAG] for r in runs) == names
    assert all(r.info.status == "FINISHED" for r in runs)


# ----------------------------------------------------------------------------- scenario 10


def test_a_resumed_job_closes_the_stale_runs_it_owns(tmp_path: Path) -> None:
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    uri = cfg.tracking.uri
    experiment_id = check_store(uri, "aoq")
    client = MlflowClient(uri)
    dead = f"{socket.gethostname()}:999999999:1"  # a driver that no longer exists

    def leftover(name: str, owner: str) -> str:
        """A RUNNING run as a SIGKILLed driver leaves it."""
        return client.create_run(experiment_id, tags={RUN_NAME_TAG: name,
                                                      DRIVER_TAG: owner}).info.run_id

    older, newest = leftover("job", dead), leftover("job", dead)
    unrelated = leftover("other-job", dead)
    handle = start_run(cfg, "job", {}, resume=True)
    assert handle.run_id == newest
    assert client.get_run(newest).info.status == "RUNNING"
    assert client.get_run(newest).data.tags["aoq.recovered_stale_run"] == "true"
    assert client.get_run(newest).data.tags[DRIVER_TAG] == driver_identity()
    assert client.get_run(older).info.status == "KILLED"
    assert client.get_run(older).data.tags["aoq.closed_as_stale"] == "true"
    assert client.get_run(unrelated).info.status == "RUNNING"  # not this job's

    # A run whose driver is alive is not taken over.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftover("busy", driver_identity(sleeper.pid))
        with pytest.raises(TrackingError, match=rf"still being trained by the live process "
                                                rf".*:{sleeper.pid}:"):
            start_run(cfg, "busy", {}, resume=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    start_run(cfg, "busy", {}, resume=True)  # once it is gone, it is stale


@pytest.mark.ray
@pytest.mark.e2e
def test_sigterm_marks_the_run_killed(tmp_path: Path, scenes_cache: Path) -> None:
    overrides = small_overrides(tmp_path, scenes_cache, "loss.variant=triplet",
                                "optim.epochs=5", "run.name=stopped")
    seed_store(tmp_path)
    run_dir = tmp_path / "runs" / "stopped"
    code = signal_driver_when([sys.executable, str(ROOT / "jobs" / "train.py"), *overrides],
                              lambda: bool(list(run_dir.glob("checkpoint_*"))), signal.SIGTERM,
                              log=tmp_path / "driver.log", cwd=tmp_path)
    log = (tmp_path / "driver.log").read_text()
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "stopped by SIGTERM" in log and "marked KILLED" in log
    client = store_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("aoq").experiment_id])
    assert run.info.status == "KILLED"
    wait_gone(x["pid"] for rank in (0, 1) for x in used_versions(run_dir, rank))


def _mining_actor_alive(storage: Path) -> bool:
    """Whether the driver given ``run.storage=<storage>`` has a live mining actor
    (a Ray actor process titled ``ray::MiningWorker``, under the Ray the driver started)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if f"run.storage={storage}" not in (proc.info["cmdline"] or []):
            continue
        try:
            return any("MiningWorker" in " ".join(child.cmdline())
                       for child in proc.children(recursive=True))
        except psutil.Error:
            return False
    return False


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.parametrize("moment", ["training", "first mining"])
def test_ctrl_c_marks_the_run_killed_and_says_how_to_resume(moment: str, tmp_path: Path,
                                                            scenes_cache: Path) -> None:
    """Before: Ctrl-C ended the run FAILED and the driver exited 1 without a word.

    During training: after epoch 1's checkpoint. During the first mining: epoch 1
    (triplet warm-up) is checkpointed, the first table version is not published, and
    the mining actor is alive: training is waiting for its first tables."""
    extra = ["loss.variant=triplet"] if moment == "training" else [
        "loss.variant=aoq", "negatives.warmup_epochs=1", "negatives.pool_actors=1"]
    overrides = small_overrides(tmp_path, scenes_cache, *extra, "optim.epochs=5",
                                "run.name=stopped")
    seed_store(tmp_path)
    run_dir = tmp_path / "runs" / "stopped"
    first_tables = run_dir / "negatives" / "v0001" / "meta.json"
    seen: dict[str, bool] = {}

    def ready() -> bool:
        if not list(run_dir.glob("checkpoint_*")):
            return False
        if moment == "first mining" and not _mining_actor_alive(tmp_path / "runs"):
            return False
        seen["first tables published"] = first_tables.exists()
        return True

    code = signal_driver_when([sys.executable, str(ROOT / "jobs" / "train.py"), *overrides],
                              ready, signal.SIGINT, log=tmp_path / "driver.log", cwd=tmp_path)
    log = (tmp_path / "driver.log").read_text()
    assert code == 128 + signal.SIGINT, log[-3000:]
    assert "stopped by Ctrl-C (SIGINT)" in log and "marked KILLED" in log, log[-3000:]
    assert "run the same command again with run.name=stopped" in log
    # The driver's own output has no traceback (Ray's processes may print their own,
    # prefixed with the process name).
    assert not any(line.startswith("Traceback") for line in log.splitlines()), log[-3000:]
    if moment == "first mining":
        assert seen["first tables published"] is False
    client = store_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("aoq").experiment_id])
    assert run.info.status == "KILLED"
    wait_gone(x["pid"] for rank in (0, 1) for x in used_versions(run_dir, rank))
