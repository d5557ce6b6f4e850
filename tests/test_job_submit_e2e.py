"""``ray job submit --working-dir . -- python jobs/train.py ...`` against a real head.

The head is private (loopback, its own ports and temp dir) and requires a token; the
job runs in Ray's temporary copy of the working dir, so everything it writes must land
at the absolute paths it was given: the MLflow store, run.storage. The head is stopped
by the PIDs it started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import seed_store, small_overrides, store_client
from ray_head import start_head

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


#: Waits for a job through Ray's job SDK, in a process with the head's token (the SDK
#: reads it from the environment), and prints its final status on the first line, then
#: its logs (what ``ray job logs`` prints). One process for the wait and the logs: each
#: new one would spend seconds importing Ray.
_WAIT_FOR_JOB = """
import os, sys, time
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(os.environ["RAY_ADDRESS"])
deadline = time.monotonic() + float(sys.argv[2])
while True:
    state = str(client.get_job_status(sys.argv[1])).rsplit(".", 1)[-1]
    if state in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
        print(state)
        print(client.get_job_logs(sys.argv[1]))
        break
    time.sleep(0.5)
"""


def _wait(head, submission_id: str, timeout: float = 600) -> tuple[str, str]:
    """(the job's final status, or "?" if it never ended; its logs)."""
    # A file, not a pipe: logs longer than a pipe's buffer would block the waiter.
    with tempfile.TemporaryFile("w+") as out:
        waiter = subprocess.Popen([sys.executable, "-c", _WAIT_FOR_JOB, submission_id,
                                   str(timeout)],
                                  env={**head.env, "RAY_ADDRESS": head.dashboard},
                                  stdout=out, stderr=subprocess.DEVNULL, text=True)
        try:
            while waiter.poll() is None:
                head.processes()  # remember the job's processes while they run
                time.sleep(0.5)
        finally:
            if waiter.poll() is None:
                waiter.kill()
            waiter.wait()
        out.seek(0)
        first, _, logs = out.read().partition("\n")
    state = first.strip()
    return (state if state in TERMINAL else "?"), logs


def test_outputs_inside_a_submitted_jobs_working_dir_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aoq.cluster.job import SUBMITTED_JOB_ENV, check_outputs_outlive_job
    from aoq.config import ConfigError, load_config

    copy = tmp_path / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    relative = load_config(None, ["run.storage=outputs"])  # made absolute inside the copy
    outside = load_config(None, [f"run.storage={tmp_path / 'runs'}",
                                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    uri = load_config(None, ["run.storage=s3://bucket/runs",
                             "tracking.uri=http://10.0.0.10:5000"])
    for cfg in (relative, outside, uri):  # outside a submitted job nothing is refused
        check_outputs_outlive_job(cfg)
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    with pytest.raises(ConfigError, match=r"run.storage=.*_ray_pkg_0123/outputs, "
                                          r"tracking.uri=.*mlflow.db: inside"):
        check_outputs_outlive_job(relative)
    check_outputs_outlive_job(outside)
    check_outputs_outlive_job(uri)


def test_submitted_job_records_run_metrics_and_best_checkpoint(tmp_path: Path,
                                                               scenes_cache: Path) -> None:
    repo_state = {p.name for p in ROOT.iterdir()}
    head = start_head(num_cpus=2, extra_env={"PYTHONPATH": str(ROOT / "platform")})
    try:
        # Auth is really on: a wrong token is refused.
        wrong = {**head.env, "RAY_AUTH_TOKEN": uuid.uuid4().hex}
        assert head.cli("job", "list", env=wrong).returncode != 0

        submission_id = f"aoq-e2e-{uuid.uuid4().hex[:8]}"
        overrides = small_overrides(tmp_path, scenes_cache, "optim.epochs=2",
                                    "loss.variant=triplet", "run.name=submitted",
                                    "tracking.experiment=submit")
        seed_store(tmp_path)
        submit = head.cli("job", "submit", "--working-dir", ".", "--no-wait",
                          "--submission-id", submission_id, "--",
                          "python", "jobs/train.py", *overrides, cwd=ROOT, timeout=180)
        assert submit.returncode == 0, submit.stdout + submit.stderr

        state, logs = _wait(head, submission_id)
        assert state == "SUCCEEDED", logs[-5000:]
        assert "rsum" in logs and "submitted" in logs

        # Relative outputs would land in Ray's temporary copy and vanish: refused at once.
        lost = f"aoq-lost-{uuid.uuid4().hex[:8]}"
        submit = head.cli("job", "submit", "--working-dir", ".", "--no-wait",
                          "--submission-id", lost, "--", "python", "jobs/train.py",
                          "run.storage=outputs", f"tracking.uri=sqlite:///{tmp_path}/x.db",
                          cwd=ROOT, timeout=180)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        state, logs = _wait(head, lost)
        assert state == "FAILED"
        assert "run.storage=" in logs and "temporary working directory" in logs, logs[-3000:]
    finally:
        head.stop()
    assert all(not p.is_running() or p.status() == "zombie" for p in head.seen.values())

    client = store_client(tmp_path)
    experiment = client.get_experiment_by_name("submit")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="tags.`aoq.run_name` = 'submitted'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert "test/rsum" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dev/rsum")] == [0, 1]
    assert "best_model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # The artifact store is absolute too (beside mlflow.db), not in the job's temp copy.
    assert (tmp_path / "mlartifacts").is_dir()

    out = tmp_path / "runs" / "submitted"
    best = torch.load(out / "best_model.pt", map_location="cpu", weights_only=True)
    best_epoch = max(client.get_metric_history(run.info.run_id, "dev/rsum"),
                     key=lambda m: m.value).step
    assert best["epoch"] == best_epoch
    assert json.loads((out / "test_metrics.json").read_text())["test/rsum"] == \
        pytest.approx(run.data.metrics["test/rsum"])
    assert any(p.name.startswith("checkpoint_") for p in out.iterdir())
    # Nothing was written into the working dir that was uploaded.
    assert {p.name for p in ROOT.iterdir()} == repo_state
