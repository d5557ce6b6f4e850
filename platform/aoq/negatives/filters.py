"""The score-margin filter of mined candidates (``negatives.score_filter``).

Hard-negative miners (sentence-transformers' ``mine_hard_negatives``, FlagEmbedding)
drop candidates that the mining model scores too close to the positive: those are the
likeliest false negatives (a caption that fits the image as well as its own do). Here,
with the mining model's scores S and margin m:

* ``i2t`` row of image i: its positive score is the mean of S(i, c) over its own
  captions c; a candidate caption is kept only if S(i, caption) < positive - m;
* ``t2i`` row of caption j: its positive is S(image of j, j); a candidate image is kept
  only if S(image, j) < positive - m.

The kept candidates move to the front of their row in their original order, so rank n
of a filtered table is the n-th best *kept* candidate, and ``negatives.range_min`` and
``negatives.sampling_range`` count kept candidates. Tables keep their width: a row with
fewer kept candidates than its width repeats them, cyclically, to fill it, so a dropped
candidate is never drawn. A row where nothing is kept stays unfiltered (there is nothing
else to draw from), and is counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["filter_rows", "image_positive_scores", "caption_positive_scores", "score_margin_of"]


def score_margin_of(neg_cfg: Any) -> float | None:
    """The filter margin of a ``negatives`` config section, or None when it is off."""
    return float(neg_cfg.score_margin) if neg_cfg.score_filter else None


def image_positive_scores(image_emb: torch.Tensor, caption_emb: torch.Tensor,
                          start: int, stop: int, cpi: int) -> np.ndarray:
    """(stop - start,) mean score of each image in [start, stop) with its own captions.

    Args:
        image_emb: (n_images, d); caption_emb: (cpi * n_images, d), captions of image i
            at rows cpi*i .. cpi*i + cpi - 1.
    """
    images = image_emb[start:stop].float()
    own = caption_emb[cpi * start:cpi * stop].float().reshape(stop - start, cpi, -1)
    return torch.einsum("nd,ncd->nc", images, own).mean(dim=1).cpu().numpy()


def caption_positive_scores(image_emb: torch.Tensor, caption_emb: torch.Tensor,
                            start: int, stop: int, cpi: int) -> np.ndarray:
    """(stop - start,) score of each caption in [start, stop) with its own image."""
    captions = caption_emb[start:stop].float()
    own = image_emb[torch.arange(start, stop) // cpi].float()
    return (captions * own).sum(dim=1).cpu().numpy()


def filter_rows(ids: np.ndarray, scores: np.ndarray, positive: np.ndarray, margin: float
                ) -> tuple[np.ndarray, dict[str, int]]:
    """Drop the candidates of each row that score at or above ``positive - margin``.

    Args:
        ids: (rows, K) candidate ids, best first.
        scores: (rows, K) their scores under the mining model.
        positive: (rows,) each row's positive score.
        margin: m >= 0.

    Returns:
        (rows, K) ids with the kept candidates first (order preserved), repeated to fill
        the row; and counts: ``dropped`` candidates, ``short_rows`` (fewer kept than K),
        ``unfiltered_rows`` (nothing kept, left as they were).
    """
    keep = scores < (positive[:, None] - margin)
    n_keep = keep.sum(axis=1)
    order = np.argsort(~keep, axis=1, kind="stable")  # kept first, each group in order
    width = ids.shape[1]
    column = np.arange(width)[None, :]
    # Column p of the output takes kept candidate p, or p mod n_keep past the last one.
    source = np.where(column < n_keep[:, None], column,
                      column % np.maximum(n_keep, 1)[:, None])
    filtered = np.take_along_axis(ids, np.take_along_axis(order, source, axis=1), axis=1)
    empty = n_keep == 0
    filtered[empty] = ids[empty]
    stats = {"dropped": int((~keep).sum() - (~keep[empty]).sum()),
             "short_rows": int(((n_keep < width) & ~empty).sum()),
             "unfiltered_rows": int(empty.sum())}
    return filtered.astype(ids.dtype, copy=False), stats
