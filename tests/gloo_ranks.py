"""Ray-free data-parallel training for tests: N processes, one gloo process group, each
running the real :class:`~aoq.training.session.TrainingSession` with its model in DDP.

What Ray Train does for a job, minus Ray: start N ranks, join them in a process group,
wrap the model in DistributedDataParallel. Several jobs run one after another in the
same ranks, so a test module pays for starting them once.

Imported by the spawned ranks, so it imports nothing from conftest (which imports Ray
and MLflow).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from aoq.config import Config
from aoq.data.prepare import PreparedData
from aoq.negatives.tables import load_tables
from aoq.storage import RunStorage
from aoq.training.session import TrainingSession
from aoq.training.steps import train_epoch


@dataclass(frozen=True)
class RankJob:
    """One training run on every rank.

    Attributes:
        cfg: the config (``optim.batch_size`` and ``batch_scope`` as the job means them).
        tables: a table version directory to train with from the first step, or None.
        steps: train only the first ``steps`` steps of epoch 0 (0: every epoch).
        gradients: return the last step's gradients instead of the weights
            (``optim.grad_clip`` should be 0 so they are the raw ones).
    """

    cfg: Config
    tables: str | None = None
    steps: int = 0
    gradients: bool = False


def run_job(job: RankJob, rank: int, world: int, prepared: PreparedData, out: Path
            ) -> dict[str, torch.Tensor]:
    """Run ``job`` as rank ``rank`` of ``world`` (a process group must exist when
    ``world > 1``); returns the final weights, or the last step's gradients."""
    cfg = job.cfg
    session = TrainingSession(cfg, prepared, RunStorage(str(out / f"rank{rank}"), "run",
                                                        cfg.data.cache_dir),
                              rank=rank, world=world)
    session.build(DistributedDataParallel if world > 1 else (lambda model: model))
    if job.tables is not None:
        session.set_tables(load_tables(job.tables), None)
    if job.steps:
        session.sampler.set_epoch(0)
        train_epoch(session.model, itertools.islice(session.loader, job.steps),
                    session.loss_for(0), session.optimizer, grad_clip=cfg.optim.grad_clip,
                    device=torch.device("cpu"), gather=session.global_batch)
    else:
        for epoch in range(cfg.optim.epochs):
            session.run_epoch(epoch)
    if job.gradients:
        return {name: p.grad.detach().clone() for name, p in session.core.named_parameters()}
    return {k: v.detach().clone() for k, v in session.core.state_dict().items()}


def _rank_main(rank: int, world: int, port: int, prepared: PreparedData, out: str,
               jobs: list[RankJob]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = [run_job(job, rank, world, prepared, Path(out) / f"job{i}")
                   for i, job in enumerate(jobs)]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")


def spawn_jobs(world: int, port: int, prepared: PreparedData, out: Path,
               jobs: list[RankJob]) -> list[dict[str, torch.Tensor]]:
    """:func:`run_job` for each job, on ``world`` spawned ranks; rank 0's results."""
    torch.multiprocessing.start_processes(
        _rank_main, args=(world, port, prepared, str(out), jobs), nprocs=world,
        start_method="spawn")
    return torch.load(out / "results.pt", weights_only=True)
