"""What gathering a global batch across ranks costs (docs/benchmarks.md §7).

Two ranks (processes joined in a gloo group, as Ray Train joins them; no Ray here), each
with one thread and the real TrainingSession, its model in DDP. Each rank trains the
same data two ways, in interleaved rounds, on the same model and tables:

* ``global``: ``optim.batch_size=B`` over both ranks, B/2 each; caption encodings,
  score rows and offline scores gathered with gradients; the loss on B x B scores;
* ``worker``: ``optim.batch_scope=worker, optim.batch_size=B/2``: the same B/2 pairs
  per rank and the same encoder work, no gather, the loss on (B/2) x (B/2) scores.

The difference per step is what the gather costs (collectives forward and backward, and
the wider score matrix and loss). Rank 0 also times the gather collectives alone with
the step's tensor shapes. Tables are mined by a freshly initialised default (vse) model,
as a ``tables:`` source (the cost does not depend on their quality).

    python benchmarks/gather.py --out /tmp/aoq-gather-bench                 # vse
    python benchmarks/gather.py --out /tmp/aoq-gather-bench model.name=scan
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_steps(session, requests, steps: list[float]) -> None:
    """Train ``requests`` (BatchRequests of this rank) one step each; append seconds."""
    import torch

    from aoq.training.steps import train_epoch

    loss_fn = session.loss_for(1)  # offline terms and max-violation, as after warm-up
    for request in requests:
        batch = session.dataset.__getitems__(request)
        start = time.perf_counter()
        train_epoch(session.model, [batch], loss_fn, session.optimizer,
                    grad_clip=session.cfg.optim.grad_clip, device=torch.device("cpu"),
                    gather=session.global_batch)
        steps.append(time.perf_counter() - start)


def time_collectives(session, request, repeats: int) -> float:
    """Seconds per step of the step's gathers alone (forward and backward), no model."""
    import torch

    from aoq.training import distributed

    batch = session.dataset.__getitems__(request)
    with torch.no_grad():
        images, captions = session.core(batch.regions, batch.tokens, batch.lengths)
    b = batch.size
    columns = captions[:b].clone().requires_grad_()
    rows = torch.randn(b, session.cfg.optim.batch_size, requires_grad=True)
    offline = torch.randn(b, 4, requires_grad=True)
    gather_columns = (distributed.all_gather_with_grad if session.core.has_global_embedding
                      else distributed.all_gather_padded)
    start = time.perf_counter()
    for _ in range(repeats):
        total = (gather_columns(columns).sum() + distributed.all_gather_with_grad(rows).sum()
                 + distributed.all_gather_with_grad(offline).sum())
        total.backward()
    return (time.perf_counter() - start) / repeats


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from aoq.config import load_config
    from aoq.data.prepare import open_split, prepare_data
    from aoq.models import build_model
    from aoq.negatives.from_model import mine_from_model
    from aoq.negatives.tables import load_tables, save_tables
    from aoq.storage import RunStorage
    from aoq.training.session import TrainingSession

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data_only = load_config(None, [f"data.cache_dir={args.cache}",
                                   *(o for o in args.overrides if o.startswith("data."))])
    prepared = prepare_data(data_only.data, progress=False)
    tables_dir = Path(out, "tables", "v0001")
    if rank == 0 and not tables_dir.exists():  # a vse model mines, as for cross attention
        torch.manual_seed(0)
        miner = build_model(data_only.model, prepared.vocab_size, prepared.feature_dim)
        neg = data_only.negatives
        i2t, t2i = mine_from_model(miner, open_split(prepared, data_only.data.train_split),
                                   k_captions=neg.k_captions, k_images=neg.k_images)
        save_tables(tables_dir.parent, 1, i2t, t2i)
    dist.barrier()
    base = [f"data.cache_dir={args.cache}", "loss.variant=aoq", f"run.num_workers={world}",
            f"negatives.source=tables:{tables_dir}", *args.overrides]
    configs = {"global": load_config(None, [*base, f"optim.batch_size={args.batch}"]),
               "worker": load_config(None, [*base, "optim.batch_scope=worker",
                                            f"optim.batch_size={args.batch // world}"])}
    tables = load_tables(tables_dir)
    sessions, requests = {}, {}
    for name, cfg in configs.items():
        session = TrainingSession(cfg, prepared, RunStorage(f"{out}/{name}{rank}", "run",
                                                            cfg.data.cache_dir),
                                  rank=rank, world=world)
        session.build(DistributedDataParallel)
        session.set_tables(tables, None)
        session.sampler.set_epoch(1)
        sessions[name], requests[name] = session, list(session.sampler)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():  # warm-up
        time_steps(session, requests[name][:2], [])
    at = 2
    for _ in range(args.rounds):
        for name, session in sessions.items():
            time_steps(session, requests[name][at:at + args.steps], times[name])
        at += args.steps
    collectives = time_collectives(sessions["global"], requests["global"][0], 20)
    dist.destroy_process_group()
    if rank == 0:
        result = {name: {"ms_per_step_median": 1000 * statistics.median(t),
                         "ms_per_step_min": 1000 * min(t), "steps": len(t)}
                  for name, t in times.items()}
        result["gather_cost_ms_per_step"] = (result["global"]["ms_per_step_median"]
                                             - result["worker"]["ms_per_step_median"])
        result["gather_cost_share"] = (result["gather_cost_ms_per_step"]
                                       / result["global"]["ms_per_step_median"])
        result["collectives_alone_ms_per_step"] = 1000 * collectives
        Path(out, "rank0.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/aoq"),
                        help="data.cache_dir")
    parser.add_argument("--batch", type=int, default=128, help="the global batch B")
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch.multiprocessing

    torch.multiprocessing.start_processes(rank_main, args=(2, free_port(), args, str(out)),
                                          nprocs=2, start_method="spawn")
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_average": os.getloadavg(), "python": sys.version.split()[0],
              "command": "python benchmarks/gather.py " + " ".join(sys.argv[1:]),
              "global_batch": args.batch, "ranks": 2,
              **json.loads((out / "rank0.json").read_text())}
    (out / "gather_results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
