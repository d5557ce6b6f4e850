"""The primitive operations of selection, each run by the library that is fastest at it
on the tensor's device.

On CPU that is NumPy for all of them (torch 2.13, one thread, best of 30-40 on the
2-core box; a 1024 x 3904 tile, ~5% of its scores at or above the threshold):

=========================================  =========  ========
operation                                  torch      NumPy
=========================================  =========  ========
``scores >= threshold`` into a mask        1.68 ms    0.72 ms
positions of the mask's hits               4.81 ms    3.47 ms
  the same, the mask extended past 10% set            1.57 ms
gather 214k scores from the tile           1.07 ms    0.23 ms
write 128 rows of 2000 int64 by row index  0.16 ms    0.04 ms
sort 197k unique int64 keys                4.75 ms    1.03 ms
110th largest of each row, 1024 x 2048     15.4 ms    2.8 ms
35th largest of each column, 512 x 3904    17.5 ms    5.7 ms
=========================================  =========  ========

(``torch.sort`` of int64 moves an index array along with the keys; NumPy's sort is a
vectorised quicksort, and ``np.partition`` a selection that never sorts.) Both release
the GIL, so the search's worker threads still run in parallel. On CUDA, and for bf16
scores (NumPy has no bf16), every operation stays in torch. Every function takes and
returns torch tensors; the NumPy views share their memory.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["HitMask", "gather", "kth_largest", "put_rows", "sort_unique"]


def _numpy_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype != torch.bfloat16


class HitMask:
    """A reusable bool mask of up to ``rows x width`` scores, and the positions of its hits.

    On CPU the buffer is followed by a tail of True entries. NumPy's ``flatnonzero`` of
    a bool array takes a branchy path when at most 10% of the entries are set, and a
    branch-free one above that: 3.2 ms against 1.5 ms for a 1024 x 4096 mask with 5% of
    its entries set (NumPy 2.4, one core). Candidate masks hold 5-7%, so each scan
    extends the mask into the tail just far enough to cross 10%, and drops the tail's
    positions, which all come last. The result is the same either way.
    """

    __slots__ = ("buf", "n", "shape", "tail")

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.n = rows * width
        # Enough True entries to lift even an empty mask above 10% (plus a margin for
        # rounding in NumPy's test); none where NumPy is not used.
        self.tail = self.n // 9 + 64 if device.type == "cpu" else 0
        self.buf = torch.zeros(self.n + self.tail, dtype=torch.bool, device=device)
        self.buf[self.n:] = True
        self.shape: tuple[int, int] | None = None

    def _view(self, rows: int, stride: int, width: int) -> torch.Tensor:
        """The (rows, width) mask with row stride ``stride`` at the start of the buffer.
        Every other entry of the first ``n`` is False: they are cleared whenever the
        shape changes, as a wider mask leaves hits where a narrower one has padding."""
        if self.shape != (rows, stride, width):
            self.buf[: self.n].zero_()
            self.shape = (rows, stride, width)
        return self.buf[: rows * stride].view(rows, stride)[:, :width]

    def hits(self, scores: torch.Tensor, threshold: torch.Tensor, stride: int) -> torch.Tensor:
        """Flat positions of the scores at or above their threshold, ascending.

        Args:
            scores: (r, w) scores (a strided view is fine).
            threshold: broadcastable to (r, w): (r, 1) per row or (w,) per column.
            stride: row stride of the mask, >= w; position = row * stride + column.

        Returns:
            (n_hits,) int64 positions.
        """
        r, w = scores.shape
        mask = self._view(r, stride, w)
        if not _numpy_ok(scores):
            torch.ge(scores, threshold, out=mask)
            return self.buf[: self.n].nonzero().view(-1)
        flat = self.buf[: self.n].numpy()
        np.greater_equal(scores.numpy(), threshold.numpy(), out=mask.numpy())
        count = int(np.count_nonzero(flat))
        extra = 0 if 10 * count > self.n else min(self.tail, (self.n - 10 * count) // 9 + 64)
        return torch.from_numpy(np.flatnonzero(self.buf.numpy()[: self.n + extra])[:count])


def gather(source: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``source[positions]`` for a 1-D ``source`` (a contiguous tensor or a slice of
    one) and (n,) int64 ``positions``; (n,) of ``source``'s dtype."""
    if not _numpy_ok(source):
        return source[positions]
    return torch.from_numpy(source.numpy()[positions.numpy()])


def put_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``out[rows] = values`` for (n,) int64 ``rows`` of a 2-D ``out`` and (n, w)
    ``values``, cast to ``out``'s dtype (0.04 ms against ``index_copy_``'s 0.16 ms for
    128 rows of 2000 int64)."""
    if not (_numpy_ok(out) and _numpy_ok(values)):
        out.index_copy_(0, rows, values.to(out.dtype))
        return
    out.numpy()[rows.numpy()] = values.numpy()


def sort_unique(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` (n,) int64, all distinct, sorted ascending *in place* (so any sort is
    stable) and returned. In place because every caller sorts a temporary it owns: a
    sorted copy of 60M keys costs as much again in fresh pages as the sort itself."""
    if keys.device.type != "cpu":
        return torch.sort(keys).values
    keys.numpy().sort()
    return keys


def kth_largest(scores: torch.Tensor, r: int, dim: int,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The ``r``-th largest score along ``dim`` (0 or 1) of a 2-D tensor, as float32:
    (rows,) for ``dim=1``, (columns,) for ``dim=0``; ``1 <= r <= scores.shape[dim]``.

    ``scratch``: a contiguous 1-D tensor of ``scores``' dtype and device with at least
    ``scores.numel()`` entries, which this may overwrite. With it, the scores are copied
    once, into memory already mapped: on the 2-core VM a fresh 8 MiB copy for each call
    cost up to 30 ms in page faults, against 2 ms for the selection itself.
    """
    rows, cols = (scores.shape[1], scores.shape[0]) if dim == 0 else scores.shape
    # Selecting along a contiguous last axis is 2x faster, so columns are transposed.
    source = scores.T if dim == 0 else scores
    if scratch is None:
        scratch = torch.empty(rows * cols, dtype=scores.dtype, device=scores.device)
    work = scratch[: rows * cols].view(rows, cols)
    work.copy_(source)  # torch's strided transpose is ~1.3x faster than NumPy's
    if not _numpy_ok(work):
        return torch.topk(work, r, dim=1, largest=True, sorted=False).values.amin(
            dim=1).float()
    x = work.numpy()
    x.partition(cols - r, axis=1)
    return torch.from_numpy(x[:, cols - r].astype(np.float32))
