"""Which candidate-table version every rank trains with, and when it changes.

A run starts with tables from the driver (``checkpoint:`` and ``tables:`` sources) or
none (``mine``: triplet warm-up first). With ``mine``, tables are (re)made at the epoch
boundaries the schedule names (:mod:`aoq.negatives.schedule`):

* ``negatives.pool_actors = 0``: rank 0 mines synchronously from the current weights and
  every rank switches to the new version before the next epoch;
* otherwise rank 0 owns an actor pool (:class:`~aoq.cluster.mining_pool.MiningPool`)
  that mines from a weights snapshot in the background while training goes on
  (:class:`~aoq.cluster.refresh.AsyncRefresher`); at the first epoch boundary after it
  finishes, rank 0 broadcasts the new version and every rank switches together. Only the
  very first tables are waited for.

A failed refresh keeps every rank on the tables it has (tag ``aoq.warning.refresh``,
metric ``negatives/refresh_failures``). The version each rank used each epoch is
appended to ``negatives/used_rank<r>.jsonl``, and the version, the next version number
and the failure count go into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np

from aoq.cluster.mining_pool import MiningPool, PoolSpec
from aoq.cluster.refresh import AsyncRefresher
from aoq.cluster.tracking import RunHandle, set_tags
from aoq.config import Config
from aoq.data.prepare import PreparedData
from aoq.models import RetrievalModel
from aoq.negatives.filters import score_margin_of
from aoq.negatives.from_model import mine_from_model
from aoq.negatives.schedule import mine_at_epoch_start, mines_during_training
from aoq.negatives.tables import CandidateTables, load_tables, save_tables, version_dir
from aoq.training import distributed
from aoq.training.run_files import tables_root, used_versions_file
from aoq.training.session import TrainingSession

log = logging.getLogger("aoq.train")

POOL_NAME_PREFIX = "aoq-miner-"  # + run name; actors show up under it in the dashboard


def build_pool(cfg: Config, prepared: PreparedData, run_name: str, role: str = "") -> MiningPool:
    """An actor pool sized by ``negatives.pool_*``, holding this run's model skeleton."""
    neg = cfg.negatives
    spec = PoolSpec(actors=neg.pool_actors, cpus=neg.pool_cpus, gpus=neg.pool_gpus,
                    threads=neg.pool_threads, shards=neg.pool_shards)
    # The pid keeps names unique when a restarted rank 0 builds a new pool before Ray has
    # reaped the old one's actors.
    name = f"{POOL_NAME_PREFIX}{run_name}-{role}{os.getpid()}"
    return MiningPool(spec, prepared, cfg.data.train_split, dataclasses.asdict(cfg.model),
                      name=name)


def pool_scorer(cfg: Config, prepared: PreparedData, run_name: str):
    """A :data:`~aoq.training.session.Scorer` that scores a split on a fresh actor pool
    (a cross-attention model's pairs cost an attention pass each), or None when
    ``negatives.pool_actors = 0``."""
    if cfg.negatives.pool_actors == 0:
        return None

    def score(model: RetrievalModel, split: str, n_images: int) -> np.ndarray:
        pool = build_pool(cfg, prepared, run_name, "eval-")
        try:
            return pool.score_split(model.state_dict(), split, n_images,
                                    shard_images=max(1, -(-n_images // (2 * len(pool)))))
        finally:
            pool.shutdown()

    return score


class TableLifecycle:
    """The table versions of one rank's run (rank 0 decides, every rank follows).

    Args:
        session: the rank's training session (its model mines; it trains with the tables).
        run: the MLflow run warnings are tagged on (rank 0).
        initial_tables: the version the driver settled on, or None.
    """

    def __init__(self, session: TrainingSession, run: RunHandle,
                 initial_tables: str | None = None) -> None:
        self.session = session
        self.cfg = session.cfg
        self.run = run
        self.rank = session.rank
        self.storage = session.storage
        self.root = tables_root(session.output_dir)
        self.next_version = 1
        self.refresh_failures = 0
        self.refresher: AsyncRefresher | None = None  # rank 0's, when mining on a pool
        if initial_tables:
            session.set_tables(self._open(initial_tables), None)

    # ------------------------------------------------------------------ checkpoints

    def state(self, epoch: int) -> dict[str, Any]:
        """This lifecycle's part of a checkpoint after ``epoch``."""
        tables, tables_epoch = self.session.tables, self.session.tables_epoch
        return {
            "next_table_version": self.next_version,
            "tables_path": tables.path if tables is not None else "",
            "tables_epoch": tables_epoch,
            # Redundant with tables_path, but what a person inspecting a checkpoint asks.
            "table_version": tables.version if tables is not None else 0,
            "table_staleness_epochs": (epoch - tables_epoch
                                       if tables_epoch is not None else None),
            "refresh_failures": self.refresh_failures,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`: reopen the version in use, and never reuse a
        version number that storage already holds."""
        tables = self._open(state["tables_path"]) if state.get("tables_path") else None
        self.next_version = int(state["next_table_version"])
        self.refresh_failures = int(state.get("refresh_failures", 0))
        neg = self.cfg.negatives
        if self.rank == 0 and neg.pool_actors and mines_during_training(neg, self.cfg.loss):
            # The pool only sees this node's copy, so it could reuse a number another node
            # published; synchronous mining reuses a stored version on purpose instead.
            stored = [int(n[1:]) for n in self.storage.names(self.root)
                      if n.startswith("v") and n[1:].isdigit()]
            self.next_version = max([self.next_version, *(v + 1 for v in stored)])
        if tables is not None:
            self.session.set_tables(tables, state.get("tables_epoch"))

    # ------------------------------------------------------------------ epoch boundary

    def prepare(self, epoch: int) -> dict[str, float]:
        """Bring every rank to the same table version before ``epoch``; record it.

        Returns:
            Metrics about the boundary (rank 0's view): refresh time and failures, and
            ``time/table_boundary_seconds``, what switching (or a synchronous mine, or
            the wait for the first tables) cost this epoch.
        """
        start = time.perf_counter()
        metrics = self._refresh(epoch)
        metrics["time/table_boundary_seconds"] = time.perf_counter() - start
        self._record_version(epoch)
        return metrics

    def _refresh(self, epoch: int) -> dict[str, float]:
        neg, loss = self.cfg.negatives, self.cfg.loss
        if not mines_during_training(neg, loss):
            return {}
        due = mine_at_epoch_start(epoch, neg, loss)
        metrics: dict[str, float] = {}
        if neg.pool_actors == 0:
            errors = self._mine_here(epoch) if due else []
        else:
            decision = distributed.broadcast_object(
                self._pool_decision(epoch, due) if self.rank == 0 else None)
            self.next_version = decision["next_version"]
            if decision["path"]:
                self.session.set_tables(self._open(decision["path"]),
                                        decision["snapshot_epochs"])
                metrics["negatives/refresh_seconds"] = decision["seconds"]
            errors = decision["errors"]
        if errors:
            self.refresh_failures += len(errors)
            if self.rank == 0:
                message = "; ".join(errors)
                tables = self.session.tables
                log.warning(f"negative refresh failed, training on table version "
                            f"{tables.version if tables else 0}: {message}")
                set_tags(self.run, {"aoq.warning.refresh": message[:4000]})
        metrics["negatives/refresh_failures"] = self.refresh_failures
        return metrics

    def _open(self, path: str) -> CandidateTables:
        if self.storage.owns(path):  # this node may not have the version yet
            self.storage.pull(path)
        train = self.session.train_split
        return load_tables(path, n_images=train.n_images,
                           captions_per_image=train.captions_per_image,
                           check_ids=self.rank == 0)

    def _mine_here(self, epoch: int) -> list[str]:
        """Rank 0 mines from the current weights; every rank then switches together.

        Returns the errors that stopped it (empty on success). A failure keeps every
        rank on the tables it has; the next due epoch tries the same version again.
        """
        version = self.next_version
        path = version_dir(self.root, version)
        error, tables = "", None
        if self.rank == 0:
            try:
                # A restarted run may have mined it already, here or on another node.
                if not self.storage.pull(path):
                    self._mine_version(version, epoch)
                tables = self._open(str(path))
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old tables
                error = f"mining table version {version}: {type(exc).__name__}: {exc}"
        error = distributed.broadcast_object(error)  # the barrier before the others read
        if error:
            return [error]
        self.next_version = version + 1
        self.session.set_tables(tables or self._open(str(path)), epoch)
        return []

    def _mine_version(self, version: int, epoch: int) -> None:
        neg = self.cfg.negatives
        start = time.perf_counter()
        i2t, t2i = mine_from_model(self.session.core, self.session.train_split,
                                   k_captions=neg.k_captions, k_images=neg.k_images,
                                   block_rows=neg.block_rows,
                                   score_margin=score_margin_of(neg))
        seconds = time.perf_counter() - start
        save_tables(self.root, version, i2t, t2i, epoch=epoch,
                    source=f"model after {epoch} epochs (rank 0)", seconds=round(seconds, 3))
        self.storage.push(version_dir(self.root, version))
        log.info(f"mined table version {version} from the model after {epoch} epochs in "
                 f"{seconds:.1f}s")

    def _pool_decision(self, epoch: int, due: bool) -> dict[str, Any]:
        """Rank 0: collect a finished refresh, start a due one, and wait only when there
        are no tables at all yet (the offline variant cannot train without them)."""
        if self.refresher is None:
            neg = self.cfg.negatives
            pool = build_pool(self.cfg, self.session.prepared, self.session.output_dir.name)
            self.refresher = AsyncRefresher(pool, self.root, neg.k_captions, neg.k_images,
                                            publish=self.storage.push,
                                            score_margin=score_margin_of(neg))
        refresher = self.refresher
        results = []
        finished = refresher.poll()
        if finished is not None:
            results.append(finished)
        have_tables = self.session.tables is not None
        # A snapshot taken before the last epoch could only be used after training ends.
        useful = not have_tables or epoch + 1 < self.cfg.optim.epochs
        if due and useful and not refresher.busy:
            self.next_version = refresher.submit(self.session.core.state_dict(),
                                                 self.next_version, epoch) + 1
        if not have_tables and refresher.busy and not any(r.path for r in results):
            waited = refresher.poll(wait=True)
            if waited is not None:
                results.append(waited)
        good = [r for r in results if r.path]
        latest = good[-1] if good else None
        return {
            "path": latest.path if latest else "",
            "snapshot_epochs": latest.snapshot_epochs if latest else None,
            "next_version": self.next_version,
            "errors": [r.error for r in results if r.error],
            "seconds": latest.seconds if latest else None,
        }

    def _record_version(self, epoch: int) -> None:
        """Append (epoch, table version, pid) to this rank's audit log, so that anyone
        can check which tables every rank trained every epoch with (the pid tells the
        attempts of a restarted worker group apart)."""
        path = used_versions_file(self.session.output_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tables = self.session.tables
        with open(path, "a") as fh:
            fh.write(json.dumps({"epoch": epoch, "version": tables.version if tables else 0,
                                 "pid": os.getpid()}) + "\n")
        self.storage.push(path)

    def close(self) -> None:
        """Wait for a refresh in flight and stop the pool."""
        if self.refresher is not None:
            self.refresher.close()
            self.refresher = None
