"""Exact top-K search by inner product, for any two sets of vectors.

``exact_topk(queries, keys, k)`` gives each query its k highest-scoring keys;
``topk_rows_and_columns`` gives, from one pass of products, each query its best keys
*and* each key its best queries. Both can leave out a band of (query group, key group)
pairs, and both are exact: equal to a stable descending sort of the full fp32 score
matrix (ties by ascending index), which is never materialised.

Layers, each importing only those below it:

* :mod:`~aoq.search.api` -- public functions, input checks, device and precision;
* :mod:`~aoq.search.bf16` -- the optional bf16 shortlist with fp32 rescoring;
* :mod:`~aoq.search.engine` -- the tiling engine (how it is fast and still exact,
  its memory and measured speed are described there);
* :mod:`~aoq.search.parallel` -- the worker pool the engine runs on;
* :mod:`~aoq.search.keys` -- candidates as int64 keys whose sort is the exact order;
* :mod:`~aoq.search.checks`, :mod:`~aoq.search.options` -- input checks and the tuning
  knobs (:class:`SearchOptions`);
* :mod:`~aoq.search.shards` -- aligned contiguous range splits for sharded work.

The package imports nothing else from ``aoq``: negatives mining
(:mod:`aoq.negatives.mining`) and evaluation build on it.
"""

from aoq.search.api import exact_topk, overlap_at_k, topk_rows_and_columns
from aoq.search.options import SearchOptions
from aoq.search.shards import Shard, plan_shards

__all__ = ["SearchOptions", "Shard", "exact_topk", "overlap_at_k", "plan_shards",
           "topk_rows_and_columns"]
