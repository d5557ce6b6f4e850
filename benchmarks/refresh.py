"""What refreshing the offline negatives every epoch costs in wall time (docs/benchmarks.md §3).

Trains the default job (aoq on ``scenes``, 2 DDP workers) three ways, one after another
in fresh local Ray instances, and reads every epoch's wall time back from MLflow:

  fixed  tables mined once after the warm-up and never refreshed (``refresh_every=0``);
  async  re-mined every epoch by the actor pool while training goes on (the default);
  sync   re-mined every epoch on rank 0 while every rank waits (``pool_actors=0``).

An epoch's wall time runs from the table switch before it to the end of its dev
evaluation (MLflow ``time/epoch_wall_seconds``). Epoch 0 (warm-up, no tables) and epoch 1
(the first mining, which every mode waits for) are the same work in all three modes, so
the comparison is over epochs 2 and later.

Example::

    python benchmarks/refresh.py --epochs 5 --out /tmp/aoq-refresh-bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

MODES = {
    "fixed": ["negatives.refresh_every=0", "negatives.pool_actors=0"],
    "async": ["negatives.refresh_every=1"],
    "sync": ["negatives.refresh_every=1", "negatives.pool_actors=0"],
}


def epoch_walls(tracking_uri: str, run_id: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "time/epoch_wall_seconds")
    return {m.step: m.value for m in history}


def run_mode(mode: str, out: Path, epochs: int, extra: list[str]) -> dict[str, object]:
    import ray

    from aoq.cluster.job import run_training
    from aoq.config import load_config

    uri = f"sqlite:///{out / 'mlflow.db'}"
    cfg = load_config(None, [f"optim.epochs={epochs}", f"run.storage={out / 'runs'}",
                             f"tracking.uri={uri}", f"run.name=refresh-{mode}",
                             "run.resume=false", *MODES[mode], *extra])
    outcome = run_training(cfg)
    ray.shutdown()  # every mode starts its own Ray, with no actors left from the last
    walls = epoch_walls(uri, outcome.run_id)
    steady = [walls[e] for e in sorted(walls) if e >= 2]
    return {"mode": mode, "job_seconds": outcome.seconds, "epoch_walls": walls,
            "steady_mean": statistics.fmean(steady), "rsum": outcome.test_metrics["test/rsum"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True,
                        help="new directory for the runs and their MLflow store")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error("--epochs must be >= 3: epochs 0 and 1 are excluded from the comparison")
    args.out.mkdir(parents=True, exist_ok=False)
    os.environ.pop("RAY_ADDRESS", None)
    results = []
    for mode in args.modes:
        start = time.perf_counter()
        print(f"[refresh-bench] {mode} ...", flush=True)
        results.append(run_mode(mode, args.out, args.epochs, args.overrides))
        print(f"[refresh-bench] {mode} done in {time.perf_counter() - start:.0f}s", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    base = next((r["steady_mean"] for r in results if r["mode"] == "fixed"), None)
    print("\n| mode | epoch wall, epochs >= 2 (s) | vs fixed | per epoch (s) | job (s) "
          "| test rsum |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['steady_mean'] / base - 1:+.1%}" if base else "n/a"
        per_epoch = ", ".join(f"{v:.1f}" for _, v in sorted(r["epoch_walls"].items()))
        print(f"| {r['mode']} | {r['steady_mean']:.1f} | {ratio} | {per_epoch} "
              f"| {r['job_seconds']:.0f} | {r['rsum']:.1f} |")
    print(f"\ncommand: python benchmarks/refresh.py {' '.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
