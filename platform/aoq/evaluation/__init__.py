"""Retrieval evaluation: recall metrics (COCO 1K folds / 5K, F30K) and their plots."""

from aoq.evaluation.metrics import (
    format_metrics_table,
    ranks_i2t,
    ranks_t2i,
    recall_curve,
    retrieval_metrics,
)
from aoq.evaluation.plots import plot_histograms, plot_recall_curves

__all__ = [
    "format_metrics_table",
    "plot_histograms",
    "plot_recall_curves",
    "ranks_i2t",
    "ranks_t2i",
    "recall_curve",
    "retrieval_metrics",
]
