"""Sharded exact mining: the same tables as :func:`mine_candidates`, one shard at a time.

A shard (:class:`aoq.search.Shard`) is a contiguous range of training images together
with their captions. Its piece of ``i2t`` is the top-K captions of its images against
*all* captions; its piece of ``t2i`` is the top-K images of its captions against *all*
images. Pieces from any number of shards, computed anywhere, concatenate to exactly the
single-shard tables.

The own-caption/own-image exclusion is done by asking for ``k + excluded`` and removing
the positives afterwards: the k best non-positives are always among the k + excluded
best overall, and removal keeps the (score desc, index asc) order, so this is exact and
needs no shard offset inside the engine.
"""

from __future__ import annotations

import numpy as np

from aoq.negatives.filters import caption_positive_scores, filter_rows, image_positive_scores
from aoq.search import Shard, exact_topk
from aoq.search.checks import as_matrix

__all__ = ["mine_shard"]


def _drop_positives(ids: np.ndarray, scores: np.ndarray, positive_lo: np.ndarray,
                    positive_hi: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, remove ids in [lo, hi) and keep the first k (order preserved), with
    their scores."""
    keep = (ids < positive_lo[:, None]) | (ids >= positive_hi[:, None])
    # Every row keeps at least k: it asked for k + (hi - lo) and removes at most hi - lo.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def mine_shard(
    shard: Shard,
    image_emb: np.ndarray,
    caption_emb: np.ndarray,
    k_captions: int,
    k_images: int,
    captions_per_image: int = 5,
    *,
    device: str | None = None,
    score_margin: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One shard's rows of the exact tables.

    Args:
        image_emb: (n_images, d) all image embeddings.
        caption_emb: (cpi * n_images, d) all caption embeddings.
        score_margin: None, or the margin of the score filter
            (:mod:`aoq.negatives.filters`) applied to the rows.

    Returns:
        i2t rows (stop - start, k_captions) int64 and t2i rows
        (cpi * (stop - start), k_images) int32.
    """
    cpi = captions_per_image
    images = np.arange(shard.start, shard.stop)
    c0, c1 = shard.scaled(cpi)  # the shard's captions
    cap_scores, cap_ids = exact_topk(image_emb[shard.start:shard.stop], caption_emb,
                                     k_captions + cpi, device=device)
    i2t, i2t_scores = _drop_positives(cap_ids, cap_scores, images * cpi, images * cpi + cpi,
                                      k_captions)
    own = np.arange(c0, c1) // cpi
    img_scores, img_ids = exact_topk(caption_emb[c0:c1], image_emb, k_images + 1,
                                     device=device)
    t2i, t2i_scores = _drop_positives(img_ids, img_scores, own, own + 1, k_images)
    if score_margin is not None:
        images_t, captions_t = as_matrix("image_emb", image_emb), as_matrix("caption_emb",
                                                                            caption_emb)
        i2t, _ = filter_rows(i2t, i2t_scores, image_positive_scores(
            images_t, captions_t, shard.start, shard.stop, cpi), score_margin)
        t2i, _ = filter_rows(t2i, t2i_scores, caption_positive_scores(
            images_t, captions_t, c0, c1, cpi), score_margin)
    return i2t.astype(np.int64), t2i.astype(np.int32)
