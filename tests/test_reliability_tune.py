"""Principle 6: Tune never hangs. Every point a space can sample is checked against the
data and the cluster before a study starts, and a worker group that can never be placed
is retried a bounded number of times, then fails the job with a clear message.

Real local Ray (2 CPUs), real Ray Train and Tune, real MLflow. (That a trial stopped by
ASHA at its last epoch drops nothing is shown on the study of tests/test_tune_e2e.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aoq.cluster.job import TrainingFailed, run_training
from aoq.cluster.tune_study import StudySpec, run_study
from aoq.config import ConfigError

from conftest import small_config, small_overrides, store_client

pytestmark = [pytest.mark.ray]


def test_a_space_that_samples_more_workers_than_the_cluster_is_refused(
        tmp_path: Path, scenes_cache: Path, local_ray) -> None:
    """Before: the resource check used only the base config (2 workers), so a trial that
    sampled 4 could never be placed and its worker group was retried forever."""
    space = tmp_path / "workers.yaml"
    space.write_text("params:\n  run.num_workers: {distribution: choice, values: [1, 4]}\n"
                     "  loss.margin_online: {distribution: uniform, low: 0.1, high: 0.3}\n")
    spec = StudySpec(name="wide", space=str(space), samples=2,
                     overrides=tuple(small_overrides(tmp_path, scenes_cache,
                                                     "loss.variant=triplet")))
    with pytest.raises(ConfigError) as info:
        run_study(spec)
    assert f"{space}: a trial could sample run.num_workers=4, loss.margin_online=0.1: " \
           "run.num_workers=4 x run.cpus_per_worker=1.0 needs 4 CPUs, but the Ray cluster " \
           "has 2" in str(info.value)
    study = tmp_path / "runs" / "studies" / "wide"
    assert not (study / "study.json").exists() and not (study / "tune").exists()


def test_values_valid_alone_but_not_together_are_refused(
        tmp_path: Path, scenes_cache: Path, local_ray) -> None:
    """Each value alone makes a valid config with the base (k_images=40, h=50); a trial
    that samples h=100 with k_images=12 would draw image negatives beyond its table."""
    space = tmp_path / "h.yaml"
    space.write_text("params:\n"
                     "  negatives.sampling_range: {distribution: choice, values: [50, 100]}\n"
                     "  negatives.k_images: {distribution: choice, values: [12, 40]}\n")
    spec = StudySpec(name="h", space=str(space), samples=1,
                     overrides=tuple(small_overrides(tmp_path, scenes_cache)))
    with pytest.raises(ConfigError, match=r"a trial could sample negatives.sampling_range=100,"
                                          r" negatives.k_images=12, which is invalid"):
        run_study(spec)


def test_a_worker_group_that_cannot_be_placed_fails_after_bounded_retries(
        tmp_path: Path, scenes_cache: Path, local_ray) -> None:
    """On a cluster this process did not start, resources are not checked up front (it
    may autoscale); a group that never fits must still end, as a failed run."""
    cfg = small_config(tmp_path, scenes_cache, "loss.variant=triplet", "optim.epochs=1",
                       "run.num_workers=4", "run.start_timeout_s=1", "run.start_retries=1",
                       "run.name=unplaceable")
    with pytest.raises(TrainingFailed) as info:
        run_training(cfg)
    assert "run 'unplaceable': the worker group (4 workers x 1 CPUs each) could not be " \
           "placed in 2 tries of run.start_timeout_s=1s (run.start_retries=1)" \
           in str(info.value)
    client = store_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("aoq").experiment_id])
    assert run.info.status == "FAILED"
