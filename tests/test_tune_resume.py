"""Kill a study's driver mid-way (SIGKILL) and resume it: no trial repeats, one run each."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import joining_env, seed_store, signal_driver_when, small_overrides, store_client

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[1]


def tune_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "tune.py"), *args]


def test_a_killed_study_resumes_without_repeating_a_trial(tmp_path: Path, scenes_cache: Path,
                                                          local_ray) -> None:
    # One worker per trial: what is tested is the study's bookkeeping, not DDP.
    overrides = small_overrides(tmp_path, scenes_cache, "loss.variant=triplet",
                                "optim.epochs=3", "run.num_workers=1")
    seed_store(tmp_path)
    trials = tmp_path / "runs" / "studies" / "resumable" / "trials"
    finished = lambda: sorted(trials.glob("*/test_metrics.json"))  # noqa: E731

    def a_second_trial_checkpointed() -> bool:
        """Kill while the next trial has trained (and checkpointed) at least one epoch."""
        return len(finished()) >= 1 and any(
            not (d / "test_metrics.json").exists() and list(d.glob("checkpoint_*"))
            for d in trials.iterdir())

    # Both drivers join the shared Ray, as a study's drivers do on a cluster; the
    # killed one's trials (Tune actors, trainers, workers) die with it.
    env = joining_env()
    signal_driver_when(
        tune_command("--space", str(ROOT / "tune_spaces" / "margins.yaml"), "--samples", "3",
                     "--scheduler", "fifo", "--max-concurrent", "1", "--name", "resumable",
                     *overrides),
        a_second_trial_checkpointed, signal.SIGKILL, log=tmp_path / "driver.log", cwd=tmp_path,
        env=env)
    first_done = {p.parent.name: p.stat().st_mtime_ns for p in finished()}

    resumed = subprocess.run(tune_command("--resume", "resumable", *overrides),
                             capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    client = store_client(tmp_path)
    experiment = client.get_experiment_by_name("aoq")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string="tags.`aoq.kind` = 'tune-study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    trial_ids = [r.data.tags["aoq.tune.trial_id"] for r in runs]
    assert len(runs) == 3 and len(set(trial_ids)) == 3  # one run per trial, no repeats
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    assert len(finished()) == 3  # every trial reached its test evaluation
    # The trial that had finished before the kill was not trained again.
    for name, mtime in first_done.items():
        assert (trials / name / "test_metrics.json").stat().st_mtime_ns == mtime
    # The interrupted trial reopened its own run and continued from its checkpoint.
    assert sum(r.data.tags.get("aoq.resumed") == "true" for r in runs) >= 1
