"""CPU time of one worker's training step, triplet and aoq, for two versions of the code
side by side (docs/benchmarks.md §5).

Each round runs, for every source tree given, a fresh process with that tree's
``platform/`` on PYTHONPATH, which trains ``--steps`` steps of ``triplet`` and then of
``aoq`` on the default model and ``scenes`` (one thread, global batch 128, no Ray),
with tables mined from a first-round checkpoint. Versions alternate round by round, so
a busy shared machine slows them alike, and the process CPU time per step (which
another process's load inflates far less than wall time) is reported beside wall time.
Only API both versions have is used: the epoch sampler, the pair dataset (the
deduplicated layout where the version has it, as its training uses it) and
``batch_scores``.

Each version also counts the floating-point operations of its steps (torch's
``FlopCounterMode``: every matrix product, forward and backward) and times a 1024^3
fp32 matrix product on one thread, this machine's ceiling for them. A step's FLOPs
over its time says how close it runs to that ceiling, and triplet's FLOPs over aoq's
is the pairs-per-second ratio the two would have at equal efficiency.

    git archive <before> | tar -x -C /tmp/before
    python benchmarks/step_versions.py --checkpoint CKPT --tree before=/tmp/before \\
        --tree after=. --out /tmp/aoq-step-versions
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def step_flops(step: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``step`` (matrix products, forward and
    backward; elementwise work is not counted, as torch's counter does not)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def gemm_ceiling_gflops(size: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of a (size x size) @ (size x size) fp32 product on the current threads,
    best of ``repeats``: what the step's matrix products can run at, at most."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # the first call sets up the kernel's buffers
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def child(checkpoint: str, steps: int, overrides: list[str]) -> dict:
    """Runs inside a version's process: ms per step of triplet and aoq."""
    import torch

    import aoq.models  # noqa: F401 - registers the models config validation checks
    from aoq.config import load_config
    from aoq.data.prepare import open_split, prepare_data
    from aoq.losses import AOQLoss
    from aoq.models import build_model
    from aoq.negatives.checkpoints import mine_from_checkpoint
    from aoq.negatives.tables import CandidateTables
    from aoq.training.batches import EpochBatchSampler, PairDataset
    from aoq.training.optim import build_optimizer
    from aoq.training.steps import batch_scores

    torch.set_num_threads(1)
    cfg = load_config(None, overrides)
    prepared = prepare_data(cfg.data, progress=False)
    train = open_split(prepared, cfg.data.train_split)
    i2t, t2i, _ = mine_from_checkpoint(checkpoint, train, cfg.negatives,
                                       vocab_size=prepared.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim).train()
    optimizer, _ = build_optimizer(cfg.optim, model)
    options = {}
    if "deduplicate" in inspect.signature(PairDataset).parameters:
        options["deduplicate"] = bool(getattr(model, "encodes_items_independently", False))
    requests = list(EpochBatchSampler(train.n_captions, cfg.optim.batch_size, seed=1))
    result = {"deduplicate": options.get("deduplicate", False)}
    setups = {}
    for variant in ("triplet", "aoq"):
        tables = (CandidateTables(i2t=i2t, t2i=t2i, meta={"version": 1})
                  if variant == "aoq" else None)
        dataset = PairDataset(train, sampling_range=cfg.negatives.sampling_range,
                              tables=tables, **options)
        loss_fn = AOQLoss(variant, margin_online=cfg.loss.margin_online)
        # The loss of the first batch on the initial weights (torch.manual_seed(0)),
        # before any step: the same for every version whose encoders compute the same
        # numbers.
        with torch.no_grad():
            initial = float(loss_fn(*batch_scores(model, dataset.__getitems__(requests[0]))))
        setups[variant] = dataset, loss_fn, initial
    for variant, (dataset, loss_fn, initial) in setups.items():

        def step(request: list[int]) -> None:
            loss = loss_fn(*batch_scores(model, dataset.__getitems__(request)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        walls, cpus = [], []
        for i, request in enumerate(requests[:steps + 2]):
            wall, cpu = time.perf_counter(), time.process_time()
            step(request)
            if i >= 2:  # the first steps pay one-off costs
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
        # Counted on the timed steps' batches again, outside the timing: the counter's
        # own bookkeeping would slow the steps it counts.
        flops = [step_flops(lambda r=r: step(r)) for r in requests[2:min(steps, 5) + 2]]
        result[variant] = {"wall_ms": 1000 * statistics.median(walls),
                           "cpu_ms": 1000 * statistics.median(cpus),
                           "gflop": statistics.mean(flops) / 1e9,
                           "initial_loss": initial}
    result["gemm_ceiling_gflops"] = gemm_ceiling_gflops()
    return result


def flop_summary(rows: list[dict]) -> dict[str, float]:
    """FLOPs per step, the rate each variant's steps reach (on the CPU clock), and the
    pairs-per-second ratio that equal rates would give (the same pairs per step)."""
    ceiling = statistics.median(r["gemm_ceiling_gflops"] for r in rows)
    out: dict[str, float] = {"gemm_ceiling_gflops": ceiling}
    for variant in ("triplet", "aoq"):
        gflop = statistics.median(r[variant]["gflop"] for r in rows)
        rate = gflop / (statistics.median(r[variant]["cpu_ms"] for r in rows) / 1000)
        out[f"{variant}_gflop_per_step"] = gflop
        out[f"{variant}_gflops"] = rate
        out[f"{variant}_share_of_ceiling"] = rate / ceiling
    out["aoq_vs_triplet_at_equal_flop_rates"] = (
        out["triplet_gflop_per_step"] / out["aoq_gflop_per_step"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="first-round best_model.pt")
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=DIR",
                        help="a version: a name and its source tree (repeat)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.checkpoint, args.steps, args.overrides)))
        return
    trees = dict(t.split("=", 1) for t in args.tree)
    samples: dict[str, list[dict]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve() / "platform")}
            done = subprocess.run(
                [sys.executable, __file__, "--child", "--checkpoint", args.checkpoint,
                 "--tree", "unused=.", "--out", str(args.out), "--steps", str(args.steps),
                 *args.overrides], env=env, capture_output=True, text=True, check=True)
            samples[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(round_, name, samples[name][-1], flush=True)
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_average": os.getloadavg(), "python": sys.version.split()[0],
              "command": "python benchmarks/step_versions.py " + " ".join(sys.argv[1:]),
              "versions": {}}
    for name, rows in samples.items():
        summary = {"deduplicate": rows[0]["deduplicate"]}
        for variant in ("triplet", "aoq"):
            for clock in ("cpu_ms", "wall_ms"):
                summary[f"{variant}_{clock}"] = statistics.median(r[variant][clock]
                                                                  for r in rows)
            summary[f"{variant}_initial_loss"] = rows[0][variant]["initial_loss"]
        for clock in ("cpu_ms", "wall_ms"):
            summary[f"aoq_vs_triplet_pairs_per_s_{clock[:-3]}"] = (
                summary[f"triplet_{clock}"] / summary[f"aoq_{clock}"])
        summary.update(flop_summary(rows))
        result["versions"][name] = summary
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_versions_results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
