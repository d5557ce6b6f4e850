"""1, 2 and 4 workers on the same global batch end with the same weights
(docs/benchmarks.md §7).

Real Ray Train jobs on a small ``scenes`` set (the tests' sizes; global batch 32):
1 and 2 workers on a local Ray, 4 workers on a simulated multi-node cluster
(``ray.cluster_utils.Cluster``: a head with 0 CPUs and 4 nodes of 1 CPU, so each worker
runs on its own node and everything between them goes over the network stack). Each
job's final weights (its last checkpoint) are compared with the 1-worker job's.

Two table schedules, both mined by the job (``negatives.source=mine``, synchronously on
rank 0, ``negatives.pool_actors=0``, so when tables change does not depend on timing):

* ``mined-once``: mined from the initial weights before epoch 0, never refreshed;
* ``refreshed``: the default schedule, one triplet warm-up epoch, then re-mined from the
  current weights before every epoch. Weights that differ in their last bits can order
  two near-tied candidates differently, so tables may differ in a few entries.

    python benchmarks/workers.py --out /tmp/aoq-workers-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

SMALL = ["data.scenes.n_train=240", "data.scenes.n_dev=40", "data.scenes.n_test=100",
         "data.scenes.feature_dim=32", "data.scenes.n_regions=12", "model.embed_dim=32",
         "model.word_dim=16", "optim.batch_size=32", "data.dev_max_images=40",
         "negatives.k_captions=100", "negatives.k_images=40", "negatives.sampling_range=50",
         "loss.variant=aoq", "negatives.source=mine", "negatives.pool_actors=0",
         "run.cpus_per_worker=1"]
SCHEDULES = {
    "mined-once": ["optim.epochs=2", "negatives.warmup_epochs=0", "negatives.refresh_every=0"],
    "refreshed": ["optim.epochs=3", "negatives.warmup_epochs=1", "negatives.refresh_every=1"],
}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def train(out: Path, name: str, workers: int, overrides: list[str]) -> dict:
    from aoq.cluster.job import run_training
    from aoq.config import load_config
    from aoq.training.checkpoint import newest_complete_checkpoint

    cfg = load_config(None, [*SMALL, f"data.cache_dir={out / 'cache'}",
                             f"run.storage={out / 'runs'}", f"run.name={name}",
                             f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
                             f"run.num_workers={workers}", "run.resume=false", *overrides])
    start = time.perf_counter()
    outcome = run_training(cfg)
    seconds = time.perf_counter() - start
    newest = sorted(Path(outcome.output_dir).glob("checkpoint_*"))[-1]
    return {"weights": newest_complete_checkpoint(newest, workers).state["model"],
            "dir": Path(outcome.output_dir), "seconds": seconds}


def local_jobs(out: Path, schedule: str) -> dict[int, dict]:
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    try:
        return {w: train(out, f"{schedule}-{w}w", w, SCHEDULES[schedule]) for w in (1, 2)}
    finally:
        ray.shutdown()


def cluster_job(out: Path, schedule: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    gcs, dashboard = free_ports(2)
    sim = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": gcs, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard})
    try:
        for _ in range(4):
            sim.add_node(num_cpus=1, object_store_memory=200 * 1024 * 1024)
        sim.wait_for_nodes()
        sim.connect()
        return train(out, f"{schedule}-4w-cluster", 4, SCHEDULES[schedule])
    finally:
        ray.shutdown()
        sim.shutdown()


def compare(reference: dict, other: dict) -> dict:
    import numpy as np

    a, b = reference["weights"], other["weights"]
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    tables = {}
    for version in sorted(p.name for p in (reference["dir"] / "negatives").glob("v*")):
        for table in ("i2t", "t2i"):
            x, y = (np.load(run["dir"] / "negatives" / version / f"{table}.npy",
                            allow_pickle=False) for run in (reference, other))
            tables[f"{version}/{table}"] = f"{int((x != y).sum())} of {x.size} entries differ"
    return {"max_abs_weight_difference": diff, "tables": tables,
            "job_seconds": other["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for schedule in SCHEDULES:
        local = local_jobs(out, schedule)
        four = cluster_job(out, schedule)
        results[schedule] = {"1 worker job_seconds": local[1]["seconds"],
                             "2 workers vs 1": compare(local[1], local[2]),
                             "4 workers (4 nodes) vs 1": compare(local[1], four)}
        print(json.dumps({schedule: results[schedule]}, indent=2), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "python": sys.version.split()[0],
              "command": "python benchmarks/workers.py " + " ".join(sys.argv[1:]),
              "results": results}
    (out / "workers_results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
