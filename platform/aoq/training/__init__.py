"""Training without Ray: batches with offline draws, steps, schedule, checkpoint files,
and the per-rank training session."""

from aoq.training.checkpoint import CheckpointError, load_file, save_file
from aoq.training.optim import build_optimizer
from aoq.training.steps import EpochStats, batch_scores, train_epoch, unwrap

__all__ = [
    "CheckpointError", "EpochStats", "batch_scores", "build_optimizer", "load_file",
    "save_file", "train_epoch", "unwrap",
]
