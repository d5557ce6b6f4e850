"""Mining time of the actor pool with 1, 2 and 4 actors on a simulated multi-node cluster.

``ray.cluster_utils.Cluster`` starts a head with no CPUs and N worker nodes with one
logical CPU each, all on this machine; each actor reserves one CPU, so M actors land on
M different nodes and their shards, weights and embeddings travel through the object
store as they would between machines. Every configuration mines the same weights on the
same split; the tables must be identical to single-process mining.

What it shows: the coordination cost (object store, scheduling, assembly) and how the
work divides across actors. What it cannot show on a small machine: real speed-up. All
"nodes" share this machine's cores, so beyond the core count more actors only time-slice.

Example::

    python benchmarks/pool_scaling.py --actors 1 2 4 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shards-per-actor", type=int, default=2)
    parser.add_argument("overrides", nargs="*",
                        help="KEY=VALUE config overrides (data, model, negatives)")
    args = parser.parse_args(argv)

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from aoq.cluster.mining_pool import MiningPool, PoolSpec
    from aoq.config import load_config
    from aoq.data.prepare import open_split, prepare_data
    from aoq.models import build_model
    from aoq.negatives.from_model import mine_from_model

    cfg = load_config(None, args.overrides)
    prepared = prepare_data(cfg.data, progress=True)
    split = open_split(prepared, cfg.data.train_split)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim).eval()
    weights = model.state_dict()
    neg = cfg.negatives
    torch.set_num_threads(1)
    start = time.perf_counter()
    reference = mine_from_model(model, split, k_captions=neg.k_captions,
                                k_images=neg.k_images, block_rows=neg.block_rows)
    single = time.perf_counter() - start
    print(f"[scaling] {split.n_images} images x {split.n_images * split.captions_per_image} "
          f"captions, K={neg.k_captions}/{neg.k_images}; single process, 1 thread: "
          f"{single:.2f}s", flush=True)

    os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(max(args.actors)):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    rows = []
    try:
        for m in args.actors:
            spec = PoolSpec(actors=m, cpus=1.0, threads=1, shards=args.shards_per_actor * m)
            pool = MiningPool(spec, prepared, cfg.data.train_split,
                              dataclasses.asdict(cfg.model))
            try:
                nodes = {ray.get(a.node.remote()) for a in pool.actors}
                pool.mine(weights, 0, neg.k_captions, neg.k_images)  # actors warm
                times = []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    i2t, t2i = pool.mine(weights, r + 1, neg.k_captions, neg.k_images)
                    times.append(time.perf_counter() - t0)
                    if not (np.array_equal(i2t, reference[0])
                            and np.array_equal(t2i, reference[1])):
                        raise SystemExit(f"{m} actors: tables differ from single-process")
            finally:
                pool.shutdown()
            rows.append((m, len(nodes), min(times), statistics.median(times)))
            print(f"[scaling] {m} actors on {len(nodes)} nodes: best {min(times):.2f}s, "
                  f"median {statistics.median(times):.2f}s (tables identical)", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()

    base = rows[0][2]
    print(f"\nmachine: {os.cpu_count()} cores; single-process reference {single:.2f}s")
    print("| actors | nodes used | best (s) | median (s) | speed-up vs first row |")
    print("|---|---|---|---|---|")
    for m, nodes, best, median in rows:
        print(f"| {m} | {nodes} | {best:.2f} | {median:.2f} | {base / best:.2f}x |")
    print(f"\ncommand: python benchmarks/pool_scaling.py {' '.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
