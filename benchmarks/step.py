"""Training throughput: pairs/s for triplet and aoq with 1 and 2 DDP workers, and the share
of step time spent waiting for data (the target: >= 90% in forward/backward; docs/benchmarks.md §5).

Four real jobs (Ray Train, the default ``vse`` model on ``scenes``), one after another in
fresh local Ray instances. ``aoq`` takes its tables from a first-round checkpoint, so it
trains with offline negatives (three encoder blocks per step) from its first step. Each
job runs two epochs; the second is measured (the first pays one-off costs: page cache,
allocator warm-up). Every worker reserves one CPU and runs one torch thread.

Then one worker's step is profiled in this process (torch.profiler over real batches
from the same data path): time in fetching the batch vs. forward, backward and the
optimizer step.

    python benchmarks/step.py --out /tmp/aoq-step-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

METRICS = ("train/samples_per_s", "train/data_wait_fraction", "train/epoch_seconds")


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


def profile_steps(checkpoint: str, steps: int, extra: list[str]) -> dict[str, float]:
    """Seconds per step spent in each phase of one worker's aoq step, profiled."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from aoq.config import load_config
    from aoq.training.batches import EpochBatchSampler, PairDataset, make_loader
    from aoq.data.prepare import open_split, prepare_data
    from aoq.losses import AOQLoss
    from aoq.models import build_model
    from aoq.negatives.checkpoints import mine_from_checkpoint
    from aoq.negatives.tables import CandidateTables
    from aoq.training.optim import build_optimizer
    from aoq.training.steps import batch_scores

    torch.set_num_threads(1)
    cfg = load_config(None, extra)
    prepared = prepare_data(cfg.data, progress=False)
    train = open_split(prepared, cfg.data.train_split)
    i2t, t2i, _ = mine_from_checkpoint(checkpoint, train, cfg.negatives,
                                       vocab_size=prepared.vocab_size)
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim)
    optimizer, _ = build_optimizer(cfg.optim, model)
    dataset = PairDataset(train, sampling_range=cfg.negatives.sampling_range,
                          tables=CandidateTables(i2t=i2t, t2i=t2i, meta={"version": 1}))
    sampler = EpochBatchSampler(len(dataset), cfg.optim.batch_size, rank=0, world=2)
    loss_fn = AOQLoss.from_config(cfg.loss)
    batches = iter(make_loader(dataset, sampler, cfg.data.loader_workers))
    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def timed(phase: str, fn):
        start = time.perf_counter()
        with record_function(phase):
            value = fn()
        phases[phase] += time.perf_counter() - start
        return value

    next(batches)  # first batch: one-off costs
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            batch = timed("data", lambda: next(batches))
            loss = timed("forward", lambda: loss_fn(*batch_scores(model, batch)))
            optimizer.zero_grad(set_to_none=True)
            timed("backward", loss.backward)
            timed("optimizer", optimizer.step)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(phases.values())
    return {**{f"{k}_seconds_per_step": v / steps for k, v in phases.items()},
            **{f"{k}_share": v / total for k, v in phases.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("RAY_ADDRESS", None)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    first = run_job(out, "step-first-round", ["loss.variant=triplet", "optim.epochs=1",
                                               "run.num_workers=2", *args.overrides])
    checkpoint = str(Path(first.output_dir) / "best_model.pt")
    rows = []
    for variant in ("triplet", "aoq"):
        for workers in (1, 2):
            source = [f"negatives.source=checkpoint:{checkpoint}"] if variant == "aoq" else []
            outcome = run_job(out, f"step-{variant}-{workers}w", [
                f"loss.variant={variant}", "optim.epochs=2", f"run.num_workers={workers}",
                *source, *args.overrides])
            m = epoch_metrics(uri, outcome.run_id, 1)
            rows.append({"variant": variant, "workers": workers,
                         "pairs_per_s": m["train/samples_per_s"] * workers,
                         "data_wait_fraction": m["train/data_wait_fraction"],
                         "epoch_seconds": m["train/epoch_seconds"]})
            print(json.dumps(rows[-1]), flush=True)
    profiled = profile_steps(checkpoint, args.profile_steps, args.overrides)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
              f"{os.cpu_count()} CPUs", "python": sys.version.split()[0],
              "command": "python benchmarks/step.py " + " ".join(sys.argv[1:]),
              "jobs": rows, "profile_aoq_one_worker": profiled}
    (out / "step_results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
