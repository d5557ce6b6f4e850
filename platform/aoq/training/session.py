"""One rank's training run, without Ray or MLflow.

:class:`TrainingSession` builds the model (identically initialised on every rank), the
optimizer and the data, trains epochs with whatever candidate tables it is handed,
evaluates dev and keeps the best weights, evaluates test at the end, and gives and
takes its part of a checkpoint as plain values. It never decides *which* tables to
use (``aoq.cluster.table_lifecycle`` does) and never logs to a tracking server (its
callers do, with the metrics it returns), so it runs as well in a unit test or a
notebook as on a Ray Train worker. Rank communication goes through
:mod:`aoq.training.distributed`, a no-op with one rank.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aoq.atomic import atomic_write, atomic_write_text
from aoq.config import Config
from aoq.data.prepare import PreparedData, SplitArrays, open_split
from aoq.evaluation import (
    plot_histograms, plot_recall_curves, ranks_i2t, ranks_t2i, recall_curve, retrieval_metrics,
)
from aoq.evaluation.scoring import n_scored_images, score_split
from aoq.losses import AOQLoss
from aoq.models import RetrievalModel, build_model
from aoq.models.files import load_file, model_record, save_file
from aoq.negatives.schedule import loss_config_for_epoch
from aoq.negatives.tables import CandidateTables
from aoq.storage import RunStorage
from aoq.training.batches import (
    EpochBatchSampler, GlobalBatchSampler, PairDataset, make_loader,
)
from aoq.training.memory import MemoryWatch
from aoq.training.optim import build_optimizer
from aoq.training.run_files import (
    BEST_MODEL_FILE, RECALL_CURVES_FILE, RECALL_PLOT_FILE, TEST_METRICS_FILE,
    hardness_plot_file,
)
from aoq.training.steps import EpochStats, train_epoch, unwrap

# Ray Train tees print() into its logger as well as stdout, so every line would show
# twice there; a logger shows once.
log = logging.getLogger("aoq.train")

#: Anchors per epoch whose negative hardness rank 0 records for the histogram.
HARDNESS_SAMPLES = 4096

#: ``scorer(model, split name, n_images)`` -> the (n_images, cpi * n_images) score
#: matrix; lets a caller score a cross-attention model's test split elsewhere (on an
#: actor pool) instead of in this process.
Scorer = Callable[[RetrievalModel, str, int], np.ndarray]


def _identity(model: torch.nn.Module) -> torch.nn.Module:
    return model


class TrainingSession:
    """Model, optimizer, data and best-so-far of one rank.

    Args:
        cfg: the validated config (parsed once, by the driver).
        prepared: the driver's data preparation result.
        storage: where the run's files go; everything written under
            ``storage.work_dir`` is pushed to it (a no-op for a plain path).
        rank, world: this rank and the number of ranks.
        device: where this rank trains.
    """

    def __init__(self, cfg: Config, prepared: PreparedData, storage: RunStorage, *,
                 rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu")) -> None:
        self.cfg = cfg
        self.prepared = prepared
        self.storage = storage
        self.output_dir = Path(storage.work_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.device = rank, world, device
        self.train_split: SplitArrays = open_split(prepared, cfg.data.train_split)
        self.dev_split: SplitArrays = open_split(prepared, cfg.data.dev_split)
        self.tables: CandidateTables | None = None
        #: Epochs the model that mined :attr:`tables` had trained (None: not mined here).
        self.tables_epoch: int | None = None
        self.start_epoch = 0
        self.best_rsum = -math.inf
        # Peaks of anonymous (must not grow with the dataset) and file-backed
        # (memory-mapped features and tables) resident memory of this rank.
        self.memory = MemoryWatch()
        self.model: torch.nn.Module | None = None

    # ------------------------------------------------------------------ setup

    def build(self, prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = _identity
              ) -> None:
        """Model, optimizer, scheduler and loader.

        ``prepare_model`` wraps the model for distributed training (DDP) and moves it to
        the device; the seed makes every rank start from the same weights.
        """
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        core = build_model(cfg.model, self.prepared.vocab_size, self.prepared.feature_dim)
        self.model = prepare_model(core)
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, self.model)
        # A global batch is the same pairs with the same offline draws for any number of
        # ranks; a per-worker batch is each rank's own (see aoq.training.batches).
        sampler_class = GlobalBatchSampler if self.global_batch else EpochBatchSampler
        self.dataset = PairDataset(self.train_split, seed=cfg.run.seed, rank=self.rank,
                                   sampling_range=cfg.negatives.sampling_range,
                                   draws="pair" if self.global_batch else "batch",
                                   deduplicate=core.encodes_items_independently,
                                   range_min=cfg.negatives.range_min)
        self.sampler = sampler_class(len(self.dataset), cfg.optim.batch_size,
                                     rank=self.rank, world=self.world, seed=cfg.run.seed)
        self.loader = make_loader(self.dataset, self.sampler, cfg.data.loader_workers,
                                  pin_memory=self.device.type == "cuda")

    @property
    def global_batch(self) -> bool:
        """Whether ``optim.batch_size`` is the whole step's batch over all ranks."""
        return self.cfg.optim.batch_scope == "global"

    @property
    def core(self) -> RetrievalModel:
        """The model itself (not its DDP wrapper)."""
        if self.model is None:
            raise RuntimeError("call build() first")
        return unwrap(self.model)

    def set_tables(self, tables: CandidateTables | None, snapshot_epoch: int | None) -> None:
        """Train with ``tables`` from the next epoch on (mined after ``snapshot_epoch``
        epochs of training, or None when they came from elsewhere)."""
        self.tables = tables
        self.tables_epoch = snapshot_epoch
        self.dataset.set_tables(tables)

    # ------------------------------------------------------------------ checkpoints

    def state(self, epoch: int) -> dict[str, Any]:
        """This session's part of a checkpoint after 0-based ``epoch`` (plain values)."""
        return {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best_rsum": self.best_rsum,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (of the same config): the next epoch is
        ``state["epoch"] + 1``."""
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_rsum = float(state["best_rsum"])
        if self.rank == 0:
            # This node may be new to the run: fetch the best weights so far.
            self.storage.pull(self.output_dir / BEST_MODEL_FILE)

    # ------------------------------------------------------------------ epochs

    def loss_for(self, epoch: int) -> AOQLoss:
        """The loss epoch ``epoch`` trains with (triplet until tables exist, and the
        max-violation warm-up; see :mod:`aoq.negatives.schedule`)."""
        return AOQLoss.from_config(loss_config_for_epoch(
            epoch, self.cfg.negatives, self.cfg.loss, have_tables=self.tables is not None))

    def _progress(self, epoch: int, total_steps: int) -> Callable[[int, float], None] | None:
        if self.rank != 0:
            return None
        every = max(1, total_steps // 4)
        start = time.perf_counter()
        global_batch = self.cfg.optim.batch_size * (1 if self.global_batch else self.world)

        def on_step(step: int, loss: float) -> None:
            if step % every == 0 or step == total_steps:
                rate = step * global_batch / (time.perf_counter() - start)
                log.info(f"epoch {epoch + 1}/{self.cfg.optim.epochs} step {step}/{total_steps} "
                         f"loss {loss:.3f} ({rate:.0f} pairs/s)")

        return on_step

    def run_epoch(self, epoch: int) -> tuple[dict[str, float], EpochStats]:
        """Train 0-based ``epoch``; rank 0 also evaluates dev and keeps the best weights.

        Returns:
            The epoch's metrics (training terms, lr, memory, table version; on rank 0
            also ``dev/*``) and the raw statistics (with hardness samples on rank 0).
        """
        loss_fn = self.loss_for(epoch)
        self.sampler.set_epoch(epoch)
        stats = train_epoch(self.model, self.loader, loss_fn, self.optimizer,
                            grad_clip=self.cfg.optim.grad_clip, device=self.device,
                            on_step=self._progress(epoch, len(self.sampler)),
                            hardness_samples=HARDNESS_SAMPLES if self.rank == 0 else 0,
                            memory=self.memory, gather=self.global_batch)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        metrics: dict[str, float] = {"epoch": epoch, "lr": lr, **stats.as_metrics(),
                                     **self.memory.as_metrics()}
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
            log.info(f"epoch {epoch + 1}/{self.cfg.optim.epochs}: loss "
                     f"{stats.terms.get('loss', 0):.3f} ({loss_fn.variant}), dev rsum "
                     f"{dev['rsum']:.1f} (best {self.best_rsum:.1f}), "
                     f"{stats.samples_per_second * self.world:.0f} pairs/s")
        return metrics, stats

    def evaluate_dev(self) -> dict[str, float]:
        """Retrieval metrics of the current weights on the dev split's first
        ``data.dev_max_images`` images."""
        scores = score_split(self.core, self.dev_split, max_images=self.cfg.data.dev_max_images)
        return retrieval_metrics(scores)

    def _save_best(self, epoch: int, rsum: float) -> None:
        record = model_record(self.cfg.model, self.core, vocab_size=self.prepared.vocab_size,
                              img_dim=self.prepared.feature_dim,
                              vocab_fingerprint=self.prepared.vocab_fingerprint,
                              n_regions=self.prepared.signature.n_regions,
                              vocab_path=self.prepared.vocab_path, epoch=epoch, dev_rsum=rsum)
        save_file(self.output_dir / BEST_MODEL_FILE, record)
        self.storage.push(self.output_dir / BEST_MODEL_FILE)

    def hardness_plot(self, epoch: int, hardness: dict[str, np.ndarray]) -> Path | None:
        """Histogram of how close negatives came to positives in ``epoch`` (a PNG under
        the run directory, pushed to storage), or None without samples."""
        if not hardness:
            return None
        path = hardness_plot_file(self.output_dir, epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = {"online": "hardest in-batch caption", "offline": "offline caption negative"}
        plot_histograms({labels.get(k, k): v for k, v in hardness.items()}, path,
                        xlabel="S(I, T_neg) - S(I, T)   (> 0: negative outscores positive)",
                        title=f"negative hardness, epoch {epoch + 1}")
        self.storage.push(path)
        return path

    # ------------------------------------------------------------------ test

    def evaluate_test(self, scorer: Scorer | None = None) -> dict[str, float]:
        """Score the test split with the best weights; write ``test_metrics.json``, the
        recall curves and their plot (pushed to storage).

        Args:
            scorer: scores a cross-attention model's split elsewhere (see
                :data:`Scorer`); None scores it here. Global-embedding models are always
                scored here (a dot product per pair).

        Returns:
            ``test/*`` metrics.
        """
        best = self.output_dir / BEST_MODEL_FILE
        core = self.core
        if self.storage.pull(best):
            core.load_state_dict(load_file(best)["model"])
        split_name = self.cfg.data.test_split
        test = open_split(self.prepared, split_name)
        if scorer is None or core.has_global_embedding:
            def progress(done: int, total: int) -> None:
                log.info(f"scoring {split_name}: shard {done}/{total}")

            scores = score_split(core, test, progress=progress)
        else:
            scores = scorer(core, split_name, n_scored_images(test, 0))
        result = retrieval_metrics(scores, folds=self.cfg.data.test_folds)
        curves = {"image→text": recall_curve(ranks_i2t(scores)),
                  "text→image": recall_curve(ranks_t2i(scores))}
        plot_recall_curves(curves, self.output_dir / RECALL_PLOT_FILE)
        curve_array = np.stack(list(curves.values()))
        atomic_write(self.output_dir / RECALL_CURVES_FILE,
                     lambda fh: np.lib.format.write_array(fh, curve_array, allow_pickle=False))
        metrics = {f"test/{k}": v for k, v in result.items()}
        atomic_write_text(self.output_dir / TEST_METRICS_FILE, json.dumps(metrics, indent=2))
        for name in (RECALL_PLOT_FILE, RECALL_CURVES_FILE, TEST_METRICS_FILE):
            self.storage.push(self.output_dir / name)
        return metrics
