"""Offline hard negatives: exact candidate tables, sharded mining, sampling.

The exact top-K search itself is :mod:`aoq.search`; ``exact_topk`` and ``overlap_at_k``
are re-exported here for the callers that have always imported them from this package.
"""

from aoq.negatives.mining import mine_candidates
from aoq.search import exact_topk, overlap_at_k

__all__ = ["exact_topk", "mine_candidates", "overlap_at_k"]
