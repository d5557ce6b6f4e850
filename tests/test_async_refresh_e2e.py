"""Training with the actor pool re-mining in the background (issue 4), end to end.

Two real DDP ranks on a real local Ray, a real MLflow store. One run loses a training
worker to SIGKILL midway and is restored by Ray Train from its last checkpoint; another
loses its whole mining pool for good. Both must finish.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from aoq.cluster.job import run_training
from aoq.cluster.table_lifecycle import POOL_NAME_PREFIX
from aoq.negatives.tables import list_versions

from conftest import (
    in_background, killing, seed_store, small_config, store_client, used_versions,
)

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.long]

EPOCHS = 6
ASYNC = ["loss.variant=aoq", "negatives.source=mine", f"optim.epochs={EPOCHS}",
         "negatives.warmup_epochs=1", "negatives.refresh_every=1", "negatives.pool_actors=2",
         "negatives.pool_shards=4"]


def metric_by_epoch(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory: pytest.TempPathFactory, scenes_cache: Path, private_ray):
    """An async-refresh run whose rank-1 training worker is SIGKILLed during epoch 4."""
    tmp = tmp_path_factory.mktemp("async")
    cfg = small_config(tmp, scenes_cache, *ASYNC, "run.name=async", "run.max_failures=1")
    seed_store(tmp)
    run_dir = Path(cfg.run.storage) / "async"

    def rank1_midway() -> list[int]:
        lines = used_versions(run_dir, 1)
        return [lines[-1]["pid"]] if any(line["epoch"] >= 3 for line in lines) else []

    with killing(rank1_midway) as killed:
        outcome = run_training(cfg)
    return tmp, run_dir, outcome, killed


def test_every_rank_switches_version_at_the_same_epoch(restarted_run) -> None:
    _, run_dir, _, _ = restarted_run
    rank0, rank1 = used_versions(run_dir, 0), used_versions(run_dir, 1)
    assert [(x["epoch"], x["version"]) for x in rank0] == \
           [(x["epoch"], x["version"]) for x in rank1]
    for pid in {x["pid"] for x in rank0}:  # within one attempt versions only move forward
        versions = [x["version"] for x in rank0 if x["pid"] == pid]
        assert versions == sorted(versions), rank0
    versions = [x["version"] for x in rank0]
    assert versions[0] == 0 and max(versions) >= 2, versions  # warm-up, then refreshed


def test_training_goes_on_while_the_pool_mines(restarted_run) -> None:
    tmp, run_dir, outcome, _ = restarted_run
    client = store_client(tmp)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    staleness = metric_by_epoch(client, outcome.run_id, "negatives/staleness_epochs")
    # Epoch 1 has to wait for the first tables (staleness 0); later epochs train on the
    # tables of an earlier snapshot while the next one is mined.
    assert staleness[1] == 0
    assert any(v >= 1 for step, v in staleness.items() if step > 1), staleness
    assert list_versions(run_dir / "negatives")[-1] >= 2
    seconds = metric_by_epoch(client, outcome.run_id, "negatives/refresh_seconds")
    assert seconds and all(v > 0 for v in seconds.values())


def test_restart_resumes_with_the_table_version_it_had(restarted_run) -> None:
    tmp, run_dir, outcome, killed = restarted_run
    assert len(killed) == 1
    lines = used_versions(run_dir, 1)
    before = [x for x in lines if x["pid"] == killed[0]]
    after = [x for x in lines if x["pid"] != killed[0]]
    assert before and after, lines
    resumed_at = after[0]["epoch"]
    # The first epoch after the restore trains on the version its checkpoint recorded:
    # the one the epoch before it used, not whatever the lost pool published since.
    checkpointed = [x for x in before if x["epoch"] == resumed_at - 1][-1]
    assert after[0]["version"] == checkpointed["version"]
    assert [x["epoch"] for x in after] == list(range(resumed_at, EPOCHS))
    client = store_client(tmp)
    versions = metric_by_epoch(client, outcome.run_id, "negatives/table_version")
    assert sorted(versions) == list(range(EPOCHS))


def test_a_permanently_failing_pool_keeps_training_on_the_old_tables(
        tmp_path_factory: pytest.TempPathFactory, scenes_cache: Path, private_ray) -> None:
    import ray

    tmp = tmp_path_factory.mktemp("async-fail")
    cfg = small_config(tmp, scenes_cache, *ASYNC, "run.name=fail")
    seed_store(tmp)
    run_dir = Path(cfg.run.storage) / "fail"
    killed: list[str] = []

    def kill_the_pool_for_good(stop: threading.Event) -> None:
        while not stop.is_set():
            if list_versions(run_dir / "negatives") and used_versions(run_dir, 0):
                # The pool's actors are named after the run and the pid of rank 0.
                owner = used_versions(run_dir, 0)[-1]["pid"]
                for i in range(2):
                    name = f"{POOL_NAME_PREFIX}fail-{owner}-{i}"
                    ray.kill(ray.get_actor(name), no_restart=True)
                    killed.append(name)
                return
            time.sleep(0.05)

    with in_background(kill_the_pool_for_good):
        outcome = run_training(cfg)
    assert len(killed) == 2
    client = store_client(tmp)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert "ActorDiedError" in run.data.tags["aoq.warning.refresh"]
    assert metric_by_epoch(client, outcome.run_id, "negatives/refresh_failures")[EPOCHS - 1] >= 1
    assert list_versions(run_dir / "negatives") == [1]
    versions = [x["version"] for x in used_versions(run_dir, 0)]
    assert versions == [0] + [1] * (EPOCHS - 1)
    assert "test/rsum" in outcome.test_metrics
