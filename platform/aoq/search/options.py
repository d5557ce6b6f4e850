"""Tuning knobs of the exact top-K search, in one frozen value.

None of them changes a result (every search is exact, see :mod:`aoq.search.engine`):
they decide speed, memory and how work is split. Tests turn them to force rare paths
(``dataclasses.replace(SearchOptions(), z=-8.0)`` sends most rows to recomputation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["SearchOptions"]


@dataclass(frozen=True)
class SearchOptions:
    """How :func:`aoq.search.exact_topk` and friends run; the defaults are measured.

    Raises:
        ValueError: from the constructor, on a field of the wrong type or out of range.
    """

    #: Seed of the pseudo-random visiting order of queries and keys. It never changes
    #: results (candidate keys hold original ids), only how the work is split.
    order_seed: int = 0x51A7
    #: Standard deviations of headroom in a sampled threshold. 3 leaves ~0.1% of rows
    #: short of k candidates (recomputed exactly); more headroom keeps more candidates
    #: per row. Negative values are allowed: every row then falls short and the exact
    #: recomputation does the work (a test of that path).
    z: float = 3.0
    #: Column candidates may grow to (1 + this) * k per column before a compaction.
    column_slack: float = 1.0
    #: ... but never compact fewer than this many keys (a compaction is a sort).
    column_cap_min: int = 1 << 16
    #: Default tile: 1024 x 4096 fp32 (16 MiB) runs MKL sgemm at ~95% of its
    #: large-matrix speed on the 2-core box, and the selection passes over it mostly hit
    #: cache. Used when a call passes ``block_rows`` / ``tile_cols`` = None.
    default_block_rows: int = 1024
    default_tile_cols: int = 4096
    #: Columns of the first tile whose scores set a row's threshold (a uniform sample,
    #: as keys are visited in random order): more is a tighter threshold, fewer is a
    #: cheaper topk; 2048 of 50k keys keeps ~1.34 k candidates per row at K = 2000.
    row_sample: int = 2048
    #: Rows of the first row block whose scores set a column's threshold (same idea).
    col_sample: int = 512
    #: Candidates are kept and sorted in groups of this many rows (row direction) /
    #: columns (column direction): a few 100k int64 keys sort ~1.6x faster per key
    #: than millions (they stay in cache), and the grouping is free (it follows row /
    #: column slices). The column slice must be a power of two: a flat position in its
    #: mask splits into (row, column) with a shift and a mask.
    sort_rows: int = 128
    col_slice: int = 512
    #: On CPU, run one single-threaded worker per torch thread of the caller (at most
    #: ``max_workers``), each taking whole row blocks (see :mod:`aoq.search.parallel`);
    #: False: one worker on the calling thread with the caller's torch threads (always
    #: so on CUDA).
    use_workers: bool = True
    max_workers: int = 16
    #: bf16 mode keeps this many times k candidates by bf16 score before fp32 rescoring.
    bf16_shortlist: float = 1.5

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for name in ("default_block_rows", "default_tile_cols", "row_sample", "col_sample",
                     "sort_rows", "col_slice", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"SearchOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.column_cap_min < 0:
            raise ValueError(f"SearchOptions.column_cap_min must be >= 0, got "
                             f"{self.column_cap_min}")
        if not math.isfinite(self.z):
            raise ValueError(f"SearchOptions.z must be finite, got {self.z}")
        if not (math.isfinite(self.column_slack) and self.column_slack >= 0.0):
            raise ValueError(f"SearchOptions.column_slack must be finite and >= 0, got "
                             f"{self.column_slack}")
        if not (math.isfinite(self.bf16_shortlist) and self.bf16_shortlist >= 1.0):
            raise ValueError(f"SearchOptions.bf16_shortlist must be finite and >= 1, got "
                             f"{self.bf16_shortlist}")
        if self.col_slice & (self.col_slice - 1):
            raise ValueError(f"SearchOptions.col_slice must be a power of two, got "
                             f"{self.col_slice}")

    @property
    def col_slice_bits(self) -> int:
        """log2 of :attr:`col_slice`."""
        return self.col_slice.bit_length() - 1


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Field types, from the (string) annotations: bool is not an int here, an int is a
    float."""
    if annotation == "bool":
        ok = isinstance(value, bool)
    elif annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:  # "float"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"SearchOptions.{name} must be {annotation}, got {value!r}")
