"""The offline candidate tables of AOQ, from one exact pass of products.

``mine_candidates`` builds both tables:

* ``i2t`` (n_images, k_captions) int64: per image, its k_captions highest-scoring
  captions, the image's own captions (columns ``cpi*i .. cpi*i + cpi - 1``) excluded;
* ``t2i`` (n_captions, k_images) int32: per caption ``j``, its k_images highest-scoring
  images, its own image ``j // cpi`` excluded.

They are the row and column top-k of the image x caption score matrix with the band
``(1, cpi)`` excluded, computed by :func:`aoq.search.topk_rows_and_columns` (how that
is fast and still exact: :mod:`aoq.search.engine`). Every row is sorted by descending
score, equal scores by ascending index, so the tables are a pure function of the
embeddings and equal a brute-force stable sort of the full score matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aoq.negatives.filters import caption_positive_scores, filter_rows, image_positive_scores
from aoq.search import SearchOptions, topk_rows_and_columns
from aoq.search.checks import as_matrix, check_finite, check_int

__all__ = ["mine_candidates"]


def mine_candidates(
    image_emb: Any,
    caption_emb: Any,
    k_captions: int,
    k_images: int,
    captions_per_image: int = 5,
    *,
    block_rows: int | None = None,
    tile_cols: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    precision: str = "fp32",
    stats: dict[str, Any] | None = None,
    options: SearchOptions | None = None,
    score_margin: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact offline candidate tables from one pass of products.

    Args:
        image_emb: (n_images, d) image embeddings, numpy or torch; float32 (float16,
            bfloat16 and float64 are converted to float32). Similarity is the inner
            product, so L2-normalise upstream for cosine.
        caption_emb: (n_captions, d) caption embeddings, n_captions =
            captions_per_image * n_images; the captions of image i are rows
            ``cpi*i .. cpi*i + cpi - 1``.
        k_captions: width of ``i2t``, 0 <= k_captions <= n_captions - captions_per_image.
        k_images: width of ``t2i``, 0 <= k_images <= n_images - 1.
        captions_per_image: cpi (5 for COCO and Flickr30K).
        block_rows: images per block (default 1024); memory grows linearly with it.
        tile_cols: captions per tile (default 4096, rounded to a multiple of 64); a
            tile of block_rows x tile_cols fp32 scores should fit in the last-level cache.
        device: where to compute; default CUDA when available, else CPU.
        progress: show a tqdm bar over row blocks.
        precision: "fp32" (exact), "tf32" (TF32 products on CUDA; not exact) or
            "bf16": bf16 products pick a shortlist of ``1.5 * k`` per row, which is
            rescored exactly in fp32. The last two are not guaranteed exact (compare
            with :func:`aoq.search.overlap_at_k`); they only pay where those products
            are much faster than fp32 and gathers are cheap (GPUs).
        stats: if given, filled with counters (candidates, recomputed rows, ...).
        options: search tuning (:class:`aoq.search.SearchOptions`); None: defaults.
        score_margin: None, or the margin m of the score filter: each row keeps only
            candidates scoring below its positive minus m, first and in order
            (:mod:`aoq.negatives.filters`).

    Returns:
        ``(i2t, t2i)``: i2t (n_images, k_captions) int64 caption ids and t2i
        (n_captions, k_images) int32 image ids, each row by descending score, equal
        scores by ascending id; a row never holds its own captions / own image.

    Raises:
        ValueError: on inconsistent shapes, counts, K out of range, non-float or
            non-finite embeddings, or an unknown precision.
    """
    cpi = check_int("captions_per_image", captions_per_image, minimum=1)
    images = as_matrix("image_emb", image_emb)
    captions = as_matrix("caption_emb", caption_emb)
    n_images, n_captions = images.shape[0], captions.shape[0]
    if n_images == 0:
        raise ValueError("image_emb has no rows")
    if images.shape[1] != captions.shape[1]:
        raise ValueError(f"image_emb has dimension {images.shape[1]} but caption_emb has "
                         f"{captions.shape[1]}")
    if n_captions != cpi * n_images:
        raise ValueError(f"caption_emb has {n_captions} rows, expected captions_per_image "
                         f"* n_images = {cpi} * {n_images} = {cpi * n_images}")
    k_captions = check_int("k_captions", k_captions, minimum=0,
                           maximum=n_captions - cpi, why="n_captions - captions_per_image")
    k_images = check_int("k_images", k_images, minimum=0, maximum=n_images - 1,
                         why="n_images - 1")
    check_finite("image_emb", images)
    check_finite("caption_emb", captions)
    # Scores are kept only for the filter, and t2i is built as int32 in place: the
    # tables are all that training reads, and they are large.
    filtering = score_margin is not None
    (i2t_scores, i2t), (t2i_scores, t2i) = topk_rows_and_columns(
        images, captions, k_captions, k_images, exclude_groups=(1, cpi),
        block_rows=block_rows, tile_cols=tile_cols, device=device,
        progress="mining" if progress else False, precision=precision, stats=stats,
        want_scores=filtering, column_dtype=torch.int32, check_finite=False,
        options=options)
    if filtering:
        i2t, i2t_stats = filter_rows(i2t, i2t_scores, image_positive_scores(
            images, captions, 0, n_images, cpi), score_margin)
        t2i, t2i_stats = filter_rows(t2i, t2i_scores, caption_positive_scores(
            images, captions, 0, n_captions, cpi), score_margin)
        if stats is not None:
            stats["score_filter"] = {"i2t": i2t_stats, "t2i": t2i_stats}
    return i2t, t2i
