"""Ray-free data-parallel training for tests: N processes, one gloo process group, each
running the real :class:`~aoq.training.session.TrainingSession` with its model in DDP.

What Ray Train does for a job, minus Ray: start N ranks, join them in a process group,
wrap the model in DistributedDataParallel. Tables follow the ``mine`` schedule of a
job with ``negatives.pool_actors=0``: after ``mine_after`` epochs rank 0 mines from its
current weights, saves the version, and every rank switches to it.

Imported by the spawned ranks, so it imports nothing from conftest (which starts
nothing, but imports Ray and MLflow).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from aoq.config import Config
from aoq.data.prepare import PreparedData
from aoq.negatives.from_model import mine_from_model
from aoq.negatives.tables import load_tables, save_tables
from aoq.storage import RunStorage
from aoq.training import distributed
from aoq.training.session import TrainingSession


def train(rank: int, world: int, cfg: Config, prepared: PreparedData, out: str,
          tables: str | None = None, mine_after: int | None = None) -> dict[str, torch.Tensor]:
    """Train ``cfg.optim.epochs`` epochs as rank ``rank`` of ``world``; returns the final
    weights (rank 0 also saves them to ``<out>/weights.pt``).

    ``tables``: a table version directory to train with from the start; ``mine_after``:
    mine tables from rank 0's model after that many epochs instead.
    """
    torch.set_num_threads(1)
    root = Path(out)
    session = TrainingSession(cfg, prepared,
                              RunStorage(str(root / f"rank{rank}"), "run", cfg.data.cache_dir),
                              rank=rank, world=world)
    session.build(DistributedDataParallel if world > 1 else (lambda model: model))
    if tables is not None:
        session.set_tables(load_tables(tables), None)
    for epoch in range(cfg.optim.epochs):
        if epoch == mine_after:
            def mine() -> str:
                i2t, t2i = mine_from_model(session.core, session.train_split,
                                           k_captions=cfg.negatives.k_captions,
                                           k_images=cfg.negatives.k_images)
                return str(save_tables(root / "tables", 1, i2t, t2i, epoch=epoch))

            session.set_tables(load_tables(distributed.rank_zero_value(rank, mine)), epoch)
        session.run_epoch(epoch)
    weights = {k: v.detach().clone() for k, v in session.core.state_dict().items()}
    if rank == 0:
        torch.save(weights, root / "weights.pt")
    return weights


def _rank_main(rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(rank, world, *args)
    finally:
        dist.destroy_process_group()


def train_ranks(world: int, port: int, cfg: Config, prepared: PreparedData, out: Path,
                tables: str | None = None, mine_after: int | None = None
                ) -> dict[str, torch.Tensor]:
    """:func:`train` on ``world`` spawned ranks; returns rank 0's final weights."""
    torch.multiprocessing.start_processes(
        _rank_main, args=(world, port, (cfg, prepared, str(out), tables, mine_after)),
        nprocs=world, start_method="spawn")
    return torch.load(out / "weights.pt", weights_only=True)
