"""A simulated multi-node cluster (``ray.cluster_utils.Cluster``): a head with 0 CPUs and
two worker nodes. Training workers and mining actors spread across the nodes; a node
removed mid-run (a reclaimed spot node) does not stop the job, which restarts its
workers from the last checkpoint on a replacement node and finishes.

Each node takes 2 CPUs; a training worker reserves 1.5 and a mining actor 0.5, so no
node can hold two of either: placement is forced across nodes, not left to chance.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import seed_store, small_overrides, store_client
from ray_head import free_ports

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.long]

NODE = {"num_cpus": 2, "object_store_memory": 200 * 1024 * 1024}


@pytest.fixture
def cluster() -> Iterator[object]:
    import os

    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the shared local instance; this test needs its cluster
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_ports(2)
    sim = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": gcs_port, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port})
    try:
        for _ in range(2):
            sim.add_node(**NODE)
        sim.wait_for_nodes()
        sim.connect()
        yield sim
    finally:
        ray.shutdown()
        sim.shutdown()


def _first_registered_checkpoint(run_dir: Path, job: threading.Thread, timeout: float = 600
                                 ) -> str | None:
    """The first checkpoint Ray Train has *registered* (a restart resumes from it), while
    the job runs. A checkpoint directory appears in storage before the controller
    registers it; the controller's snapshot file in the run directory lists only
    registered ones, so that is what is polled."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while job.is_alive() and time.monotonic() < deadline:
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            results = []
        if results:
            return results[0]["checkpoint_dir_name"]
        time.sleep(0.2)
    return None


def _actor_nodes(class_name: str) -> list[str]:
    from ray.util.state import list_actors

    return [a.node_id for a in list_actors(filters=[("class_name", "=", class_name)],
                                           detail=True, limit=1000)]


def test_spread_and_node_loss(cluster, tmp_path: Path, scenes_cache: Path) -> None:
    from aoq.cluster.job import run_training
    from aoq.config import load_config

    workers = sorted(cluster.worker_nodes, key=lambda n: n.unique_id)
    head_id = cluster.head_node.node_id
    cfg = load_config(None, small_overrides(
        tmp_path, scenes_cache, "optim.epochs=4", "loss.variant=offtri",
        "negatives.warmup_epochs=1", "negatives.pool_actors=2", "negatives.pool_cpus=0.5",
        "run.cpus_per_worker=1.5", "run.max_failures=1", "run.name=multinode",
        "tracking.experiment=multinode"))
    seed_store(tmp_path)
    run_dir = tmp_path / "runs" / "multinode"

    # The job runs on a thread (as a Tune trial's fit() does) so that this, the main
    # thread, can start the replacement node: Ray's Node installs signal handlers.
    result: dict[str, object] = {}

    def train() -> None:
        try:
            result["outcome"] = run_training(cfg)
        except BaseException as exc:  # noqa: BLE001 - re-raised below on the main thread
            result["error"] = exc

    job = threading.Thread(target=train, daemon=True)
    job.start()
    events: dict[str, object] = {}
    # After the first checkpoint is on storage: kill one worker node without warning
    # (a reclaimed spot node), and bring up a replacement (the autoscaler's job).
    checkpoint = _first_registered_checkpoint(run_dir, job)
    if checkpoint is not None:
        events["checkpoint"] = checkpoint
        events["train_nodes"] = _actor_nodes("RayTrainWorker")
        events["removed"] = workers[0].node_id
        cluster.remove_node(workers[0], allow_graceful=False)
        cluster.add_node(**NODE)
        events["replaced"] = True
    job.join(timeout=600)
    assert not job.is_alive(), "the job did not finish after the node loss"
    if "error" in result:
        raise result["error"]
    outcome = result["outcome"]

    assert events.get("replaced"), events
    # Before the loss, the two DDP ranks ran on the two worker nodes, none on the head.
    before = set(events["train_nodes"])
    assert before == {w.node_id for w in workers}
    # The mining actors were spread over both worker nodes as well.
    miners = _actor_nodes("MiningWorker")
    assert head_id not in miners and len(set(miners)) >= 2
    assert events["removed"] in miners or events["removed"] in before

    # The job finished, after a restart that resumed from a checkpoint, not from epoch 0.
    client = store_client(tmp_path)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and "test/rsum" in run.data.metrics
    history = client.get_metric_history(outcome.run_id, "dev/rsum")
    assert {m.step for m in history} == {0, 1, 2, 3}
    rows = [json.loads(line) for line in
            (run_dir / "negatives" / "used_rank0.jsonl").read_text().splitlines()]
    attempts: dict[int, list[int]] = {}
    for row in rows:
        attempts.setdefault(row["pid"], []).append(row["epoch"])
    assert len(attempts) == 2, rows
    first, second = attempts.values()
    assert first[0] == 0 and second[0] > 0 and second[-1] == 3, rows
    after = set(_actor_nodes("RayTrainWorker")) - before
    assert after, "the restarted workers ran on the replacement node"
