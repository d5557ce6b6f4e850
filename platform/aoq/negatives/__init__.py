"""Offline hard negatives: exact blocked top-K mining, candidate tables, sampling."""

from aoq.negatives.mining import exact_topk, mine_candidates, overlap_at_k

__all__ = ["exact_topk", "mine_candidates", "overlap_at_k"]
