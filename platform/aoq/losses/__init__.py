"""Losses as pure functions of similarity scores (no embeddings, no Ray)."""

from aoq.losses.aoq_loss import TERM_NAMES, VARIANTS, AOQLoss, OfflineScores

__all__ = ["AOQLoss", "OfflineScores", "TERM_NAMES", "VARIANTS"]
