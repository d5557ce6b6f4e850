"""The function every Ray Train worker runs: a training session plus its table lifecycle.

Per epoch: every rank switches to the same candidate-table version
(:class:`~aoq.cluster.table_lifecycle.TableLifecycle`), trains it
(:class:`~aoq.training.session.TrainingSession`; rank 0 also evaluates dev and keeps
the best weights) and reports its piece of the checkpoint (rank 0: the training state;
each rank: its RNG state), which Ray merges into one checkpoint directory. Rank 0 logs
the epoch's metrics to the driver's MLflow run only after that checkpoint is stored, so
a kill in between makes the restored run log the epoch once, never twice. At the end
rank 0 evaluates the best weights on test.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from aoq.cluster.table_lifecycle import TableLifecycle, pool_scorer
from aoq.cluster.tracking import (
    RunHandle, bound_http_requests, log_artifact, log_metrics, logged_steps, set_tags,
)
from aoq.config import Config
from aoq.data.prepare import PreparedData
from aoq.models.files import save_file
from aoq.storage import RunStorage
from aoq.training import distributed
from aoq.training.checkpoint import (
    STATE_FILE, LoadedCheckpoint, capture_rng, load_checkpoint,
    newest_complete_checkpoint, restore_rng, rng_file,
)
from aoq.training.session import TrainingSession

log = logging.getLogger("aoq.train")


@dataclass(frozen=True)
class WorkerPayload:
    """Everything the driver hands the workers (all picklable plain values).

    Attributes:
        config: the validated config; workers use it as is (it is never parsed twice).
        prepared: the driver's data preparation result.
        run: the MLflow run to log into.
        output_dir: absolute local directory for best weights, tables and test outputs
            (the same path on every node; see :class:`aoq.storage.RunStorage`).
        initial_tables: a table version directory to start with (``checkpoint:`` and
            ``tables:`` sources), or None.
    """

    config: Config
    prepared: PreparedData
    run: RunHandle
    output_dir: str
    initial_tables: str | None = None


class Worker:
    """One rank: its session, its table lifecycle, and what it reports to Ray and MLflow."""

    def __init__(self, payload: WorkerPayload, rank: int, world: int,
                 device: torch.device) -> None:
        cfg = payload.config
        self.cfg, self.run, self.rank = cfg, payload.run, rank
        # Everything written under output_dir is pushed to run.storage (a no-op for a
        # plain path), and pulled from it on a node that lacks it.
        storage = RunStorage(cfg.run.storage, Path(payload.output_dir).name,
                             cfg.data.cache_dir)
        self.session = TrainingSession(cfg, payload.prepared, storage, rank=rank,
                                       world=world, device=device)
        self.session.build(ray.train.torch.prepare_model)
        self.tables = TableLifecycle(self.session, payload.run, payload.initial_tables)
        self.last_metrics: dict[str, float] = {}  # rank 0's last epoch report

    # ------------------------------------------------------------------ restore

    def restore(self, checkpoint_dir: str) -> None:
        """Continue from a Ray checkpoint directory (a resumed or restarted run).

        Rank 0 picks the newest *complete* checkpoint (a corrupt latest one falls back to
        the previous, an unregistered complete one is not lost) and every rank then reads
        that one. Everything is read before anything is applied, so a failure leaves no
        rank half restored.
        """
        world = self.session.world
        found: list[LoadedCheckpoint] = []

        def choose() -> str:
            found.append(newest_complete_checkpoint(checkpoint_dir, world))
            return str(found[0].path)

        # Only the choice travels; a failure to find one is raised on every rank.
        chosen = distributed.rank_zero_value(self.rank, choose)
        loaded = found[0] if found else load_checkpoint(chosen, world)
        for path, why in loaded.skipped:
            log.warning(f"rank {self.rank}: skipping checkpoint {path}: {why}")
        if loaded.skipped and self.rank == 0:
            set_tags(self.run, {"aoq.warning.checkpoint": (
                f"resumed from {loaded.path.name}; skipped " +
                "; ".join(why for _, why in loaded.skipped))[:4000]})
        state = loaded.state
        self.session.load_state(state)
        self.tables.load_state(state)
        restore_rng(loaded.rng[self.rank])
        if self.rank == 0 and state.get("metrics"):
            # Metrics reach MLflow only after their checkpoint is stored (run_epoch), so
            # the restored epoch's may be missing (killed in between), never doubled.
            if int(state["epoch"]) not in logged_steps(self.run, "epoch"):
                log_metrics(self.run, state["metrics"], step=int(state["epoch"]))

    # ------------------------------------------------------------------ epochs

    def run_epoch(self, epoch: int) -> None:
        wall_start = time.perf_counter()
        boundary = self.tables.prepare(epoch)
        metrics, stats = self.session.run_epoch(epoch)
        metrics = warmup_apart(metrics)
        metrics.update(boundary)
        if self.rank == 0:
            metrics["time/epoch_wall_seconds"] = time.perf_counter() - wall_start
        self.last_metrics = metrics
        self._report(metrics, epoch)
        distributed.barrier()  # every rank's part of the checkpoint is stored
        if self.rank == 0:
            # Only now, with the epoch's checkpoint stored: a kill before this line makes
            # the restored run log the epoch from its checkpoint, a kill after it leaves a
            # checkpoint to resume from; either way each epoch is logged once.
            log_metrics(self.run, metrics, step=epoch)
            plot = self.session.hardness_plot(epoch, stats.hardness)
            if plot is not None:
                log_artifact(self.run, plot, "hardness")

    def _report(self, metrics: dict[str, float], epoch: int) -> None:
        with tempfile.TemporaryDirectory(prefix="aoq-ckpt-") as tmp:
            if self.rank == 0:
                state = {**self.session.state(epoch), **self.tables.state(epoch),
                         # What rank 0 logs for this epoch, so a restore can log what a
                         # kill lost.
                         "metrics": _plain_numbers(metrics)}
                save_file(Path(tmp) / STATE_FILE, state)
            save_file(Path(tmp) / rng_file(self.rank), capture_rng())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # ------------------------------------------------------------------ test

    def finish(self) -> None:
        """Rank 0 evaluates the best weights on test; every rank reports once more."""
        metrics: dict[str, float] = {}
        if self.rank == 0:
            session = self.session
            metrics = session.evaluate_test(pool_scorer(self.cfg, session.prepared,
                                                        session.output_dir.name))
            log_metrics(self.run, metrics, step=self.cfg.optim.epochs)
        # The last epoch's dev metrics ride along: a Tune scheduler requires its metric
        # and time attribute in every result, this one included.
        ray.train.report({**self.last_metrics, "final": 1, **metrics})

    def close(self) -> None:
        self.tables.close()


#: The online terms a max-violation warm-up epoch sums over every in-batch negative.
WARMUP_TERMS = ("online_image_anchor", "online_caption_anchor")


def warmup_apart(metrics: dict[str, float]) -> dict[str, float]:
    """Keep a warm-up epoch's loss from flattening every loss chart.

    During the max-violation warm-up the online terms sum the hinge over all in-batch
    negatives, two orders of magnitude above the hardest-negative terms of the epochs
    after it. For such an epoch (the loss reported ``train/hardest_*``), ``train/<term>``
    and ``train/loss`` hold the hardest-negative values of the same batches, so every
    ``train/`` chart shows one quantity throughout, and the sums it optimised go to
    ``warmup/<term>`` and ``warmup/loss``. Other epochs are returned unchanged.
    """
    if not all(f"train/hardest_{term}" in metrics for term in WARMUP_TERMS):
        return metrics
    out = dict(metrics)
    out["warmup/loss"] = metrics["train/loss"]
    for term in WARMUP_TERMS:
        hardest = out.pop(f"train/hardest_{term}")
        out[f"warmup/{term}"] = metrics[f"train/{term}"]
        out[f"train/{term}"] = hardest
        out["train/loss"] += hardest - metrics[f"train/{term}"]
    return out


def _plain_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report (with all metrics) and every checkpoint at INFO; the
    epoch line says the same in one line. Its report logger is named by file path."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: its report lines just stay visible
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config = {"payload": WorkerPayload}``."""
    payload: WorkerPayload = config["payload"]
    bound_http_requests()  # workers on other nodes do not inherit the driver's env
    log.setLevel(logging.INFO)
    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    cfg = payload.config
    # One intra-op thread per reserved CPU: more would oversubscribe the other ranks.
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    worker = Worker(payload, ctx.get_world_rank(), ctx.get_world_size(),
                    ray.train.torch.get_device())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            worker.restore(directory)
    try:
        for epoch in range(worker.session.start_epoch, cfg.optim.epochs):
            worker.run_epoch(epoch)
    finally:
        worker.close()
    worker.finish()


__all__ = ["Worker", "WorkerPayload", "train_loop_per_worker", "warmup_apart"]
