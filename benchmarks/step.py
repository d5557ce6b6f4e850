"""Training throughput: pairs/s for triplet and aoq with 1 and 2 DDP workers, the share of
step time spent waiting for data, what the gather of a global batch costs, and one
worker's step profiled side by side (docs/benchmarks.md §5).

Jobs: real Ray Train jobs, the default ``vse`` model on ``scenes``, one after another in
fresh local Ray instances, global batch ``optim.batch_size`` (default 128). ``aoq``
takes its tables from a first-round checkpoint, so it trains with offline negatives from
its first step. Each job runs two epochs; the second is measured (the first pays
one-off costs: page cache, allocator warm-up). Every worker reserves one CPU and runs
one torch thread. One more job, ``aoq`` with 2 workers and ``optim.batch_scope=worker``
at half the batch, does each worker's same work without the gather: the difference to
the 2-worker global job is what gathering costs.

Profile: one worker's step in this process (no Ray, one thread), over real batches of
the same data path, in interleaved rounds: ``triplet``, ``aoq`` with every slot encoded
(the straightforward step) and ``aoq`` with each distinct image and caption encoded
once (what training runs). The two aoq steps must give the same loss on the same
batch and weights (checked here; pinned by tests/test_global_batch.py).

    python benchmarks/step.py --out /tmp/aoq-step-bench
    python benchmarks/step.py --out /tmp/aoq-step-bench --profile-only CHECKPOINT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

METRICS = ("train/samples_per_s", "train/data_wait_fraction", "train/epoch_seconds")
PROFILED = ("triplet", "aoq_every_slot", "aoq_distinct")


def epoch_metrics(uri: str, run_id: str, epoch: int) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return {key: next(m.value for m in client.get_metric_history(run_id, key) if m.step == epoch)
            for key in METRICS}


def run_job(out: Path, name: str, overrides: list[str]):
    import ray

    from aoq.cluster.job import run_training
    from aoq.config import load_config

    cfg = load_config(None, [f"run.storage={out / 'runs'}",
                             f"tracking.uri=sqlite:///{out / 'mlflow.db'}", f"run.name={name}",
                             "run.resume=false", "run.cpus_per_worker=1", *overrides])
    outcome = run_training(cfg)
    ray.shutdown()
    return outcome


def job_rows(out: Path, checkpoint: str, overrides: list[str]) -> list[dict]:
    """Pairs/s of the second epoch of each job (see the module docstring)."""
    import aoq.models  # noqa: F401 - registers the models config validation checks
    from aoq.config import load_config

    batch = load_config(None, overrides).optim.batch_size
    source = f"negatives.source=checkpoint:{checkpoint}"
    jobs = [("triplet", 1, []), ("triplet", 2, []), ("aoq", 1, [source]), ("aoq", 2, [source]),
            ("aoq", 2, [source, "optim.batch_scope=worker", f"optim.batch_size={batch // 2}"])]
    uri = f"sqlite:///{out / 'mlflow.db'}"
    rows = []
    for variant, workers, extra in jobs:
        scope = "worker" if "optim.batch_scope=worker" in extra else "global"
        outcome = run_job(out, f"step-{variant}-{workers}w-{scope}", [
            f"loss.variant={variant}", "optim.epochs=2", f"run.num_workers={workers}",
            *overrides, *extra])
        m = epoch_metrics(uri, outcome.run_id, 1)
        rows.append({"variant": variant, "workers": workers, "batch_scope": scope,
                     "pairs_per_step": batch,
                     "pairs_per_s": m["train/samples_per_s"] * workers,
                     "data_wait_fraction": m["train/data_wait_fraction"],
                     "epoch_seconds": m["train/epoch_seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def profile_steps(checkpoint: str, steps: int, rounds: int, extra: list[str]) -> dict:
    """One worker's step, three ways, in interleaved rounds (see the module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import aoq.models  # noqa: F401 - registers the models config validation checks
    from aoq.config import load_config
    from aoq.data.prepare import open_split, prepare_data
    from aoq.losses import AOQLoss
    from aoq.models import build_model
    from aoq.negatives.checkpoints import mine_from_checkpoint
    from aoq.negatives.tables import CandidateTables
    from aoq.training.batches import GlobalBatchSampler, PairDataset
    from aoq.training.optim import build_optimizer
    from aoq.training.steps import batch_scores

    torch.set_num_threads(1)
    cfg = load_config(None, extra)
    prepared = prepare_data(cfg.data, progress=False)
    train = open_split(prepared, cfg.data.train_split)
    i2t, t2i, _ = mine_from_checkpoint(checkpoint, train, cfg.negatives,
                                       vocab_size=prepared.vocab_size)
    tables = CandidateTables(i2t=i2t, t2i=t2i, meta={"version": 1})
    torch.manual_seed(0)
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim).train()
    optimizer, _ = build_optimizer(cfg.optim, model)
    h = cfg.negatives.sampling_range
    datasets = {
        "triplet": PairDataset(train, sampling_range=h, draws="pair"),
        "aoq_every_slot": PairDataset(train, sampling_range=h, tables=tables, draws="pair"),
        "aoq_distinct": PairDataset(train, sampling_range=h, tables=tables, draws="pair",
                                    deduplicate=True),
    }
    losses = {name: AOQLoss.from_config(dataclasses.replace(
        cfg.loss, variant="triplet" if name == "triplet" else cfg.loss.variant))
        for name in PROFILED}
    sampler = GlobalBatchSampler(len(datasets["triplet"]), cfg.optim.batch_size)
    requests = list(sampler)

    def step(name: str, request) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        batch = datasets[name].__getitems__(request)
        fetched = time.perf_counter()
        scores, offline = batch_scores(model, batch)
        loss = losses[name](scores, offline)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                "data": fetched - wall, "images": batch.regions.shape[0],
                "captions": batch.tokens.shape[0], "loss": float(loss)}

    # The same batch and weights through both aoq steps: the same loss, or a bug.
    first = requests[0]
    same = [float(losses[n](*batch_scores(model, datasets[n].__getitems__(first))))
            for n in ("aoq_every_slot", "aoq_distinct")]
    for name in PROFILED:  # warm-up: allocator, page cache
        step(name, requests[1])
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in PROFILED}
    at = 2
    for _ in range(rounds):
        for name in PROFILED:
            for request in requests[at:at + steps]:
                samples[name].append(step(name, request))
        at += steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for request in requests[at:at + 5]:
            step("aoq_distinct", request)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    batch = cfg.optim.batch_size
    result: dict = {"batch": batch, "steps_per_variant": steps * rounds,
                    "aoq_loss_every_slot_vs_distinct": same}
    for name, rows in samples.items():
        wall = statistics.median(r["wall"] for r in rows)
        result[name] = {
            "wall_ms_per_step": 1000 * wall,
            "cpu_ms_per_step": 1000 * statistics.median(r["cpu"] for r in rows),
            "pairs_per_s": batch / wall,
            "data_share": sum(r["data"] for r in rows) / sum(r["wall"] for r in rows),
            "rows_encoded": {"images": statistics.mean(r["images"] for r in rows),
                             "captions": statistics.mean(r["captions"] for r in rows)}}
    for name in ("aoq_every_slot", "aoq_distinct"):
        for clock in ("wall", "cpu"):
            result[name][f"vs_triplet_pairs_per_s_{clock}"] = (
                result["triplet"][f"{clock}_ms_per_step"] / result[name][f"{clock}_ms_per_step"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile-steps", type=int, default=10,
                        help="steps per variant per round of the profile")
    parser.add_argument("--profile-rounds", type=int, default=3)
    parser.add_argument("--profile-only", metavar="CHECKPOINT",
                        help="skip the jobs; mine the profile's tables from this checkpoint")
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("RAY_ADDRESS", None)
    rows: list[dict] = []
    checkpoint = args.profile_only
    if checkpoint is None:
        first = run_job(out, "step-first-round", ["loss.variant=triplet", "optim.epochs=1",
                                                   "run.num_workers=2", *args.overrides])
        checkpoint = str(Path(first.output_dir) / "best_model.pt")
        rows = job_rows(out, checkpoint, args.overrides)
    profiled = profile_steps(checkpoint, args.profile_steps, args.profile_rounds,
                             args.overrides)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
              f"{os.cpu_count()} CPUs", "load_average": os.getloadavg(),
              "python": sys.version.split()[0],
              "command": "python benchmarks/step.py " + " ".join(sys.argv[1:]),
              "jobs": rows, "profile_one_worker": profiled}
    (out / "step_results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
