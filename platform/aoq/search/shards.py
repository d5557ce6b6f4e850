"""Aligned contiguous range splits: the unit of sharded search and sharded scoring.

Sharded top-k search is exact by construction: row top-k of ``queries[start:stop]``
against *all* keys is the same rows of the whole table, so pieces computed anywhere
concatenate to the single-pass result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Shard", "plan_shards"]


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)``; ``index`` is its position in the plan."""

    index: int
    start: int
    stop: int

    def scaled(self, factor: int) -> tuple[int, int]:
        """``(factor * start, factor * stop)``: the same range in units ``factor`` times
        finer (e.g. the rows of a second table with ``factor`` rows per row of this one)."""
        return self.start * factor, self.stop * factor


def plan_shards(n: int, n_shards: int, align: int = 1) -> list[Shard]:
    """Split ``range(n)`` into up to ``n_shards`` near-equal contiguous shards whose
    boundaries are multiples of ``align`` (e.g. an encoder's batch grid, so that a shard
    encodes bit-identically wherever it runs); fewer shards when there are not enough
    aligned boundaries."""
    units = -(-n // align)  # aligned blocks, the last one possibly short
    n_shards = max(1, min(n_shards, units))
    bounds = sorted({min(n, int(round(u)) * align)
                     for u in np.linspace(0, units, n_shards + 1)})
    return [Shard(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
