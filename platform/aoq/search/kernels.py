"""The primitive operations of selection, each run by the library that is fastest at it
on the tensor's device.

On CPU that is NumPy for three of them (torch 2.13, one thread, best of 40 on the
2-core box; a 1024 x 3904 tile, ~5% of its scores at or above the threshold):

=========================================  =========  ========
operation                                  torch      NumPy
=========================================  =========  ========
``scores >= threshold`` into a mask        1.68 ms    0.72 ms
positions of the mask's hits               4.81 ms    3.47 ms
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

__all__ = ["hits_at_or_above", "kth_largest", "sort_unique"]


def _numpy_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype != torch.bfloat16


def hits_at_or_above(scores: torch.Tensor, threshold: torch.Tensor, mask: torch.Tensor,
                     flat_mask: torch.Tensor) -> torch.Tensor:
    """Flat positions in ``flat_mask`` of the scores at or above their threshold.

    Args:
        scores: (r, w) scores (a strided view is fine).
        threshold: broadcastable to (r, w): (r, 1) per row or (w,) per column.
        mask: (r, w) bool view of ``flat_mask``, written with ``scores >= threshold``.
        flat_mask: contiguous 1-D bool tensor holding ``mask``; entries outside
            ``mask`` must be False.

    Returns:
        (n_hits,) int64 positions in ``flat_mask``, ascending.
    """
    if not _numpy_ok(scores):
        torch.ge(scores, threshold, out=mask)
        return flat_mask.nonzero().view(-1)
    np.greater_equal(scores.numpy(), threshold.numpy(), out=mask.numpy())
    return torch.from_numpy(np.flatnonzero(flat_mask.numpy()))


def sort_unique(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` (n,) int64, all distinct, in ascending order (so any sort is stable)."""
    if keys.device.type != "cpu":
        return torch.sort(keys).values
    return torch.from_numpy(np.sort(keys.numpy()))


def kth_largest(scores: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """The ``r``-th largest score along ``dim`` (0 or 1) of a 2-D tensor, as float32:
    (rows,) for ``dim=1``, (columns,) for ``dim=0``; ``1 <= r <= scores.shape[dim]``."""
    if not _numpy_ok(scores):
        return torch.topk(scores, r, dim=dim, largest=True, sorted=False).values.amin(
            dim=dim).float()
    x = scores.numpy()
    if dim == 0:
        x = np.ascontiguousarray(x.T)  # partitioning along rows is 2x faster
    m = x.shape[1]
    return torch.from_numpy(np.partition(x, m - r, axis=1)[:, m - r].astype(np.float32))
