"""Where a training run keeps its files, under ``<run.storage>/<run.name>/``.

One place for the layout, so the driver, the workers and the tools that read a run agree::

    config.yaml               the validated config (also an MLflow artifact)
    best_model.pt             the weights with the best dev rsum (a model record)
    negatives/v0001/ ...      candidate-table versions (aoq.negatives.tables)
    negatives/used_rank<r>.jsonl   which table version rank r trained each epoch with
    hardness/epoch_001.png    negative-hardness histograms
    test_metrics.json, recall_curves.png, test_recall_curves.npy   the final test
    checkpoint_*/             Ray Train's per-epoch checkpoints (state.pt, rng_rank<r>.pt)
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
BEST_MODEL_FILE = "best_model.pt"
TEST_METRICS_FILE = "test_metrics.json"
RECALL_PLOT_FILE = "recall_curves.png"
RECALL_CURVES_FILE = "test_recall_curves.npy"


def tables_root(output_dir: str | os.PathLike) -> Path:
    """The directory holding a run's candidate-table versions."""
    return Path(output_dir) / "negatives"


def used_versions_file(output_dir: str | os.PathLike, rank: int) -> Path:
    """Rank ``rank``'s audit log of the table version it trained each epoch with."""
    return tables_root(output_dir) / f"used_rank{rank}.jsonl"


def hardness_plot_file(output_dir: str | os.PathLike, epoch: int) -> Path:
    """The negative-hardness histogram of 0-based ``epoch``."""
    return Path(output_dir) / "hardness" / f"epoch_{epoch + 1:03d}.png"
