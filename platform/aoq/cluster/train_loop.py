"""The function every Ray Train worker runs: DDP training with offline negatives.

Rank 0 additionally evaluates dev each epoch, keeps the best weights, mines tables when
the schedule says so (synchronously; the other ranks wait at a barrier and then load
the same version), logs per-epoch metrics to the driver's MLflow run, and evaluates the
best weights on test at the end. Every rank reports every epoch with its piece of the
checkpoint (rank 0: model/optimizer/scheduler state; each rank: its RNG state), which
Ray merges into one checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aoq.atomic import atomic_write, atomic_write_text
from aoq.cluster.tracking import RunHandle, bound_http_requests, log_metrics
from aoq.config import Config, config_from_dict
from aoq.data.batches import EpochBatchSampler, PairDataset, make_loader
from aoq.data.prepare import PreparedData, open_split
from aoq.evaluation import retrieval_metrics
from aoq.evaluation.scoring import n_scored_images, score_split
from aoq.losses import AOQLoss
from aoq.models import build_model
from aoq.negatives.from_model import mine_from_model
from aoq.negatives.schedule import (
    loss_config_for_epoch, mine_at_epoch_start, mines_during_training,
)
from aoq.negatives.tables import CandidateTables, load_tables, save_tables, version_dir
from aoq.storage import RunStorage
from aoq.training.checkpoint import (
    STATE_FILE, CheckpointError, capture_rng, load_checkpoint, load_file, model_record,
    newest_complete_checkpoint, restore_rng, rng_file, save_file,
)
from aoq.training.memory import MemoryWatch
from aoq.training.optim import build_optimizer
from aoq.training.steps import train_epoch, unwrap

# Ray Train tees print() into its logger as well as stdout, so every line would show
# twice; a logger shows once.
log = logging.getLogger("aoq.train")

BEST_MODEL_FILE = "best_model.pt"
#: Anchors per epoch whose negative hardness rank 0 records for the histogram.
HARDNESS_SAMPLES = 4096
TEST_METRICS_FILE = "test_metrics.json"


@dataclass(frozen=True)
class WorkerPayload:
    """Everything the driver hands the workers (all picklable plain values).

    Attributes:
        config: ``config_to_dict`` of the validated config.
        prepared: the driver's data preparation result.
        run: the MLflow run to log into.
        output_dir: absolute local directory for best weights, tables and test outputs
            (the same path on every node; see :class:`aoq.storage.RunStorage`).
        initial_tables: a table version directory to start with (``checkpoint:`` and
            ``tables:`` sources), or None.
    """

    config: dict[str, Any]
    prepared: PreparedData
    run: RunHandle
    output_dir: str
    initial_tables: str | None = None


POOL_NAME_PREFIX = "aoq-miner-"  # + run name; actors show up under it in the dashboard


def tables_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "negatives"


class WorkerSession:
    """One rank's view of a training run."""

    def __init__(self, payload: WorkerPayload, rank: int, world: int, device: torch.device,
                 report) -> None:
        self.payload = payload
        self.cfg = config_from_dict(payload.config)
        self.rank, self.world, self.device = rank, world, device
        self.report = report  # ray.train.report, injected so this class is testable
        self.output_dir = Path(payload.output_dir)
        # Everything written under output_dir is pushed to run.storage (a no-op for a
        # plain path), and pulled from it on a node that lacks it.
        self.storage = RunStorage(self.cfg.run.storage, self.output_dir.name,
                                  self.cfg.data.cache_dir)
        self.prepared = payload.prepared
        self.train = open_split(self.prepared, self.cfg.data.train_split)
        self.dev = open_split(self.prepared, self.cfg.data.dev_split)
        self.tables: CandidateTables | None = None
        # Epochs the snapshot model had trained when it mined the tables in use.
        self.tables_epoch: int | None = None
        self.next_version = 1
        self.refresher = None  # rank 0's AsyncRefresher when re-mining in the background
        self.refresh_failures = 0
        self.start_epoch = 0
        self.best_rsum = -math.inf
        self.last_metrics: dict[str, float] = {}  # rank 0's last epoch report
        # Peak anonymous / file-backed memory of this worker (design.md §5: a worker's
        # memory must not grow with the dataset; memory-mapped pages are file-backed).
        self.memory = MemoryWatch()

    # ------------------------------------------------------------------ setup

    def build(self, prepare_model) -> None:
        """Model (identically initialised on every rank), optimizer, scheduler, data."""
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        core = build_model(cfg.model, self.prepared.vocab_size, self.prepared.feature_dim)
        self.model = prepare_model(core)
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, self.model)
        self.dataset = PairDataset(self.train, seed=cfg.run.seed, rank=self.rank,
                                   sampling_range=cfg.negatives.sampling_range)
        self.sampler = EpochBatchSampler(len(self.dataset), cfg.optim.batch_size,
                                         rank=self.rank, world=self.world, seed=cfg.run.seed)
        self.loader = make_loader(self.dataset, self.sampler, cfg.data.loader_workers,
                                  pin_memory=self.device.type == "cuda")
        if self.payload.initial_tables:
            self._use_tables(self.payload.initial_tables, epoch=None)

    def restore(self, checkpoint_dir: str | None) -> None:
        """Continue from a Ray checkpoint directory (a resumed or restarted run).

        Rank 0 picks the newest *complete* checkpoint (see
        :func:`~aoq.training.checkpoint.newest_complete_checkpoint`: a corrupt latest one
        falls back to the previous, an unregistered complete one is not lost) and every
        rank then reads that one. Everything is read before anything is applied, so a
        failure leaves no rank half restored.
        """
        if checkpoint_dir is None:
            return
        chosen = None
        if self.rank == 0:
            try:
                loaded = newest_complete_checkpoint(checkpoint_dir, self.world)
                chosen = str(loaded.path)
            except CheckpointError as exc:
                chosen = exc  # every rank raises it, instead of waiting for rank 0
        chosen = self._broadcast(chosen)
        if isinstance(chosen, CheckpointError):
            raise chosen
        if self.rank != 0:
            loaded = load_checkpoint(chosen, self.world)
        for path, why in loaded.skipped:
            log.warning(f"rank {self.rank}: skipping checkpoint {path}: {why}")
        if loaded.skipped and self.rank == 0:
            from aoq.cluster.tracking import set_tags

            set_tags(self.payload.run, {"aoq.warning.checkpoint": (
                f"resumed from {loaded.path.name}; skipped " +
                "; ".join(why for _, why in loaded.skipped))[:4000]})
        state = loaded.state
        tables = None
        if state.get("tables_path"):
            tables = self._open_tables(state["tables_path"])
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_rsum = float(state["best_rsum"])
        self.next_version = int(state["next_table_version"])
        self.refresh_failures = int(state.get("refresh_failures", 0))
        if self.rank == 0:
            # This node may be new to the run: fetch the best weights so far.
            self.storage.pull(self.output_dir / BEST_MODEL_FILE)
        neg = self.cfg.negatives
        if self.rank == 0 and neg.pool_actors and mines_during_training(neg, self.cfg.loss):
            # The pool never reuses a version number that storage already holds (it only
            # sees this node's copy); synchronous mining reuses a stored version instead.
            stored = [int(n[1:]) for n in self.storage.names(tables_root(self.output_dir))
                      if n.startswith("v") and n[1:].isdigit()]
            self.next_version = max([self.next_version, *(v + 1 for v in stored)])
        if tables is not None:
            self._set_tables(tables, state.get("tables_epoch"))
        restore_rng(loaded.rng[self.rank])
        if self.rank == 0 and state.get("metrics"):
            # Metrics reach MLflow only after their checkpoint is stored (run_epoch), so
            # the restored epoch's may be missing (killed in between), never doubled.
            from aoq.cluster.tracking import logged_steps

            if int(state["epoch"]) not in logged_steps(self.payload.run, "epoch"):
                log_metrics(self.payload.run, state["metrics"], step=int(state["epoch"]))

    # ------------------------------------------------------------------ negatives

    def _open_tables(self, path: str) -> CandidateTables:
        if self.storage.owns(path):  # this node may not have the version yet
            self.storage.pull(path)
        return load_tables(path, n_images=self.train.n_images,
                           captions_per_image=self.train.captions_per_image,
                           check_ids=self.rank == 0)

    def _set_tables(self, tables: CandidateTables, epoch: int | None) -> None:
        self.tables = tables
        self.tables_epoch = epoch
        self.dataset.set_tables(tables)

    def _use_tables(self, path: str, epoch: int | None) -> None:
        self._set_tables(self._open_tables(path), epoch)

    def _barrier(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def mine(self, epoch: int) -> list[str]:
        """Rank 0 mines from the current weights; every rank then switches together.

        Returns the errors that stopped it (empty on success). A failure keeps every rank
        on the tables it has; the next due epoch tries the same version again.
        """
        neg = self.cfg.negatives
        version = self.next_version
        path = version_dir(tables_root(self.output_dir), version)
        error, tables = "", None
        if self.rank == 0:
            try:
                # A restarted run may have mined it already, here or on another node.
                if not self.storage.pull(path):
                    start = time.perf_counter()
                    i2t, t2i = mine_from_model(unwrap(self.model), self.train,
                                               k_captions=neg.k_captions,
                                               k_images=neg.k_images, block_rows=neg.block_rows)
                    save_tables(tables_root(self.output_dir), version, i2t, t2i,
                                epoch=epoch, source=f"model after {epoch} epochs (rank 0)",
                                seconds=round(time.perf_counter() - start, 3))
                    self.storage.push(path)
                    log.info(f"mined table version {version} from the model after {epoch} "
                             f"epochs in {time.perf_counter() - start:.1f}s")
                tables = self._open_tables(str(path))
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old tables
                error = f"mining table version {version}: {type(exc).__name__}: {exc}"
        error = self._broadcast(error)  # also the barrier before the other ranks read
        if error:
            return [error]
        self.next_version = version + 1
        if tables is None:
            tables = self._open_tables(str(path))
        self._set_tables(tables, epoch)
        return []

    def _new_pool(self, role: str = ""):
        """An actor pool sized by ``negatives.pool_*`` holding this run's model."""
        from aoq.cluster.mining_pool import MiningPool, PoolSpec

        neg = self.cfg.negatives
        spec = PoolSpec(actors=neg.pool_actors, cpus=neg.pool_cpus, gpus=neg.pool_gpus,
                        threads=neg.pool_threads, shards=neg.pool_shards)
        # The pid keeps names unique when a restarted rank 0 builds a new pool before
        # Ray has reaped the old one's actors.
        name = f"{POOL_NAME_PREFIX}{self.output_dir.name}-{role}{os.getpid()}"
        return MiningPool(spec, self.prepared, self.cfg.data.train_split,
                          dataclasses.asdict(self.cfg.model), name=name)

    def _start_pool(self) -> None:
        """Rank 0 of a run that re-mines in the background owns the actor pool."""
        from aoq.cluster.refresh import AsyncRefresher

        neg = self.cfg.negatives
        self.refresher = AsyncRefresher(self._new_pool(), tables_root(self.output_dir), neg.k_captions,
                                        neg.k_images, publish=self.storage.push)

    def _pool_decision(self, epoch: int, due: bool) -> dict[str, Any]:
        """Rank 0: collect a finished refresh, start a due one, and wait only when there
        are no tables at all yet (the offline variant cannot train without them)."""
        if self.refresher is None:
            self._start_pool()
        assert self.refresher is not None
        results = []
        finished = self.refresher.poll()
        if finished is not None:
            results.append(finished)
        # A snapshot taken before the last epoch could only be used after training ends.
        useful = self.tables is None or epoch + 1 < self.cfg.optim.epochs
        if due and useful and not self.refresher.busy:
            self.next_version = self.refresher.submit(unwrap(self.model).state_dict(),
                                                      self.next_version, epoch) + 1
        if self.tables is None and self.refresher.busy and not any(r.path for r in results):
            waited = self.refresher.poll(wait=True)
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

    def _broadcast(self, obj: Any) -> Any:
        if self.world > 1 and torch.distributed.is_initialized():
            box = [obj]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
        return obj

    def prepare_tables(self, epoch: int) -> dict[str, float]:
        """Bring every rank to the same table version before epoch ``epoch``.

        Returns metrics about the refresh (rank 0's view).
        """
        neg, loss = self.cfg.negatives, self.cfg.loss
        due = mine_at_epoch_start(epoch, neg, loss)
        if not mines_during_training(neg, loss):
            return {}
        metrics: dict[str, float] = {}
        if neg.pool_actors == 0:
            errors = self.mine(epoch) if due else []
        else:
            decision = self._broadcast(self._pool_decision(epoch, due) if self.rank == 0
                                       else None)
            self.next_version = decision["next_version"]
            if decision["path"]:
                self._use_tables(decision["path"], decision["snapshot_epochs"])
                metrics["negatives/refresh_seconds"] = decision["seconds"]
            errors = decision["errors"]
        if errors:
            self.refresh_failures += len(errors)
            if self.rank == 0:
                from aoq.cluster.tracking import set_tags

                message = "; ".join(errors)
                log.warning(f"negative refresh failed, training on table version "
                            f"{self.tables.version if self.tables else 0}: {message}")
                set_tags(self.payload.run, {"aoq.warning.refresh": message[:4000]})
        metrics["negatives/refresh_failures"] = self.refresh_failures
        return metrics

    def close(self) -> None:
        if self.refresher is not None:
            self.refresher.close()
            self.refresher = None

    # ------------------------------------------------------------------ epochs

    def _record_version(self, epoch: int) -> None:
        """Append (epoch, table version, pid) to this rank's audit log, so that anyone
        can check which tables every rank trained every epoch with (the pid tells the
        attempts of a restarted worker group apart)."""
        path = tables_root(self.output_dir) / f"used_rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({"epoch": epoch, "version": self.tables.version if self.tables
                                 else 0, "pid": os.getpid()}) + "\n")
        self.storage.push(path)

    def _loss_for(self, epoch: int) -> AOQLoss:
        return AOQLoss.from_config(loss_config_for_epoch(
            epoch, self.cfg.negatives, self.cfg.loss, have_tables=self.tables is not None))

    def _progress(self, epoch: int, total_steps: int):
        if self.rank != 0:
            return None
        every = max(1, total_steps // 4)
        start = time.perf_counter()

        def on_step(step: int, loss: float) -> None:
            if step % every == 0 or step == total_steps:
                rate = step * self.cfg.optim.batch_size * self.world / (time.perf_counter() - start)
                log.info(f"epoch {epoch + 1}/{self.cfg.optim.epochs} step {step}/{total_steps} "
                         f"loss {loss:.3f} ({rate:.0f} pairs/s)")

        return on_step

    def evaluate_dev(self) -> dict[str, float]:
        scores = score_split(unwrap(self.model), self.dev, max_images=self.cfg.data.dev_max_images)
        return retrieval_metrics(scores)

    def _save_best(self, epoch: int, rsum: float) -> None:
        record = model_record(self.cfg.model, unwrap(self.model),
                              vocab_size=self.prepared.vocab_size,
                              img_dim=self.prepared.feature_dim,
                              vocab_path=self.prepared.vocab_path, epoch=epoch, dev_rsum=rsum)
        save_file(self.output_dir / BEST_MODEL_FILE, record)
        self.storage.push(self.output_dir / BEST_MODEL_FILE)

    def _checkpoint_state(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best_rsum": self.best_rsum,
            "next_table_version": self.next_version,
            "tables_path": self.tables.path if self.tables is not None else "",
            "tables_epoch": self.tables_epoch,
            # Redundant with tables_path, but what a person inspecting a checkpoint asks.
            "table_version": self.tables.version if self.tables is not None else 0,
            "table_staleness_epochs": (epoch - self.tables_epoch
                                       if self.tables_epoch is not None else None),
            "refresh_failures": self.refresh_failures,
            # What rank 0 logs for this epoch, so a restore can log what a kill lost.
            "metrics": {k: float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
        }

    def run_epoch(self, epoch: int) -> None:
        wall_start = time.perf_counter()
        refresh_metrics = self.prepare_tables(epoch)
        # What the table switch (and a synchronous mine, or a wait for the first tables)
        # cost this epoch: the number the asynchronous refresh exists to keep near zero.
        refresh_metrics["time/table_boundary_seconds"] = time.perf_counter() - wall_start
        self._record_version(epoch)
        loss_fn = self._loss_for(epoch)
        self.sampler.set_epoch(epoch)
        stats = train_epoch(self.model, self.loader, loss_fn, self.optimizer,
                            grad_clip=self.cfg.optim.grad_clip, device=self.device,
                            on_step=self._progress(epoch, len(self.sampler)),
                            hardness_samples=HARDNESS_SAMPLES if self.rank == 0 else 0,
                            memory=self.memory)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        metrics: dict[str, float] = {"epoch": epoch, "lr": lr, **stats.as_metrics(),
                                     **refresh_metrics, **self.memory.as_metrics()}
        metrics["negatives/table_version"] = self.tables.version if self.tables else 0
        if self.tables is not None and self.tables_epoch is not None:
            metrics["negatives/staleness_epochs"] = epoch - self.tables_epoch
        metrics["loss_variant_is_offline"] = float(loss_fn.needs_offline)
        if self.rank == 0:
            dev = self.evaluate_dev()
            metrics.update({f"dev/{k}": v for k, v in dev.items()})
            if dev["rsum"] > self.best_rsum:
                self.best_rsum = dev["rsum"]
                self._save_best(epoch, dev["rsum"])
            metrics["dev/best_rsum"] = self.best_rsum
            metrics["time/epoch_wall_seconds"] = time.perf_counter() - wall_start
            log.info(f"epoch {epoch + 1}/{self.cfg.optim.epochs}: loss "
                     f"{stats.terms.get('loss', 0):.3f} ({loss_fn.variant}), dev rsum "
                     f"{dev['rsum']:.1f} (best {self.best_rsum:.1f}), "
                     f"{stats.samples_per_second * self.world:.0f} pairs/s")
        self.last_metrics = metrics
        self._report(metrics, epoch)
        self._barrier()  # every rank's part of the checkpoint is stored
        if self.rank == 0:
            # Only now, with the epoch's checkpoint stored: a kill before this line makes
            # the restored run log the epoch from its checkpoint, a kill after it leaves a
            # checkpoint to resume from; either way each epoch is logged once.
            log_metrics(self.payload.run, metrics, step=epoch)
            self._hardness_plot(epoch, stats.hardness)

    def _hardness_plot(self, epoch: int, hardness: dict[str, np.ndarray]) -> None:
        """Histogram of how close negatives come to positives, as an MLflow artifact."""
        from aoq.cluster.tracking import log_artifact
        from aoq.evaluation import plot_histograms

        if not hardness:
            return
        path = self.output_dir / "hardness" / f"epoch_{epoch + 1:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = {"online": "hardest in-batch caption", "offline": "offline caption negative"}
        plot_histograms({labels.get(k, k): v for k, v in hardness.items()}, path,
                        xlabel="S(I, T_neg) - S(I, T)   (> 0: negative outscores positive)",
                        title=f"negative hardness, epoch {epoch + 1}")
        log_artifact(self.payload.run, path, "hardness")
        self.storage.push(path)

    def _report(self, metrics: dict[str, float], epoch: int) -> None:
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="aoq-ckpt-") as tmp:
            if self.rank == 0:
                save_file(Path(tmp) / STATE_FILE, self._checkpoint_state(epoch, metrics))
            save_file(Path(tmp) / rng_file(self.rank), capture_rng())
            self.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    # ------------------------------------------------------------------ test

    def finish(self) -> None:
        """Rank 0 evaluates the best weights on test; every rank reports once more."""
        metrics: dict[str, float] = {}
        if self.rank == 0:
            metrics = self.evaluate_test()
        # The last epoch's dev metrics ride along: a Tune scheduler requires its metric
        # and time attribute in every result, this one included.
        self.report({**self.last_metrics, "final": 1, **metrics})

    def _score_test(self, core, test) -> np.ndarray:
        """Rank 0: the test score matrix, shard by shard with progress; spread over an
        actor pool for a cross-attention model when ``negatives.pool_actors > 0`` (its
        pairs cost an attention pass each, a global model's a dot product)."""
        split_name = self.cfg.data.test_split
        n_images = n_scored_images(test, 0)

        def progress(done: int, total: int) -> None:
            log.info(f"scoring {split_name}: shard {done}/{total}")

        if core.has_global_embedding or self.cfg.negatives.pool_actors == 0:
            return score_split(core, test, progress=progress)
        pool = self._new_pool("eval-")
        try:
            return pool.score_split(core.state_dict(), split_name, n_images,
                                    shard_images=max(1, -(-n_images // (2 * len(pool)))))
        finally:
            pool.shutdown()

    def evaluate_test(self) -> dict[str, float]:
        from aoq.evaluation import plot_recall_curves, ranks_i2t, ranks_t2i, recall_curve

        best = self.output_dir / BEST_MODEL_FILE
        core = unwrap(self.model)
        if self.storage.pull(best):
            core.load_state_dict(load_file(best)["model"])
        test = open_split(self.prepared, self.cfg.data.test_split)
        scores = self._score_test(core, test)
        result = retrieval_metrics(scores, folds=self.cfg.data.test_folds)
        curves = {"image→text": recall_curve(ranks_i2t(scores)),
                  "text→image": recall_curve(ranks_t2i(scores))}
        plot_recall_curves(curves, self.output_dir / "recall_curves.png")
        curve_array = np.stack(list(curves.values()))
        atomic_write(self.output_dir / "test_recall_curves.npy",
                     lambda fh: np.lib.format.write_array(fh, curve_array, allow_pickle=False))
        metrics = {f"test/{k}": v for k, v in result.items()}
        atomic_write_text(self.output_dir / TEST_METRICS_FILE, json.dumps(metrics, indent=2))
        for name in ("recall_curves.png", "test_recall_curves.npy", TEST_METRICS_FILE):
            self.storage.push(self.output_dir / name)
        log_metrics(self.payload.run, metrics, step=self.cfg.optim.epochs)
        return metrics


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report (with all metrics) and every checkpoint at INFO; the
    epoch line says the same in one line. Its report logger is named by file path."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - other Ray layouts just stay verbose
        pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config = {"payload": WorkerPayload}``."""
    import ray.train
    import ray.train.torch

    payload: WorkerPayload = config["payload"]
    bound_http_requests()  # workers on other nodes do not inherit the driver's env
    log.setLevel(logging.INFO)
    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    cfg = config_from_dict(payload.config)
    # One intra-op thread per reserved CPU: more would oversubscribe the other ranks.
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    device = ray.train.torch.get_device()
    session = WorkerSession(payload, ctx.get_world_rank(), ctx.get_world_size(), device,
                            ray.train.report)
    session.build(ray.train.torch.prepare_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            session.restore(directory)
    try:
        for epoch in range(session.start_epoch, cfg.optim.epochs):
            session.run_epoch(epoch)
    finally:
        session.close()
    session.finish()
