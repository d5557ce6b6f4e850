"""The score matrix of a split, computed in shards of image rows.

A cross-attention model (SCAN, BFAN) has no global embedding: every (image, caption)
pair is scored by attention, so COCO 5K's 5000 x 25000 matrix takes 125M attention
evaluations. It is cut into shards of image rows; a shard encodes its images, then
scores them against the captions block by block (encoding each caption block on the
fly), so memory holds one shard's images, one caption block and its scores, never all
encodings or all intermediate attention maps. Shards are independent, so an actor pool
can score them in parallel (``aoq.cluster.mining_pool.MiningPool.score_split``), and
the rows can stream into a memory-mapped ``.npy`` instead of RAM.

Global-embedding models take the same path; their per-block similarity is a matrix
product. Shard boundaries sit on the encoding grid (multiples of ``batch_size``), so the
sharded matrix equals the single-shard one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aoq.data.prepare import SplitArrays
from aoq.models.encode import encode_captions_range, encode_images_range, eval_mode
from aoq.models.base import RetrievalModel
from aoq.search import Shard, plan_shards

#: Images per shard by default: COCO 5K is 5 shards, a 1K split one.
SHARD_IMAGES = 1024


def n_scored_images(split: SplitArrays, max_images: int) -> int:
    """Images evaluated: the first ``max_images`` (0 = all)."""
    return split.n_images if max_images <= 0 else min(max_images, split.n_images)


def score_rows(model: RetrievalModel, split: SplitArrays, start: int, stop: int, *,
               n_images: int, batch_size: int = 256) -> np.ndarray:
    """(stop - start, cpi * n_images) float32 scores of images ``[start, stop)`` against
    the captions of the first ``n_images`` images."""
    cpi = split.captions_per_image
    images = encode_images_range(model, split, start, stop, batch_size=batch_size)
    out = np.empty((stop - start, cpi * n_images), dtype=np.float32)
    with eval_mode(model):
        for lo in range(0, n_images, batch_size):
            hi = min(lo + batch_size, n_images)
            captions = encode_captions_range(model, split, lo, hi, batch_size=batch_size)
            out[:, cpi * lo:cpi * hi] = model.similarity(images, captions).float().cpu().numpy()
    return out


def plan_score_shards(n_images: int, shard_images: int, batch_size: int) -> list[Shard]:
    """Row shards of about ``shard_images`` images, aligned to the encoding grid."""
    n_shards = max(1, -(-n_images // max(1, shard_images)))
    return plan_shards(n_images, n_shards, align=batch_size)


def allocate_scores(shape: tuple[int, int], path: str | os.PathLike | None) -> np.ndarray:
    """A float32 matrix in RAM, or memory-mapped at ``path`` (a ``.npy`` file)."""
    if path is None:
        return np.empty(shape, dtype=np.float32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def score_split(
    model: RetrievalModel,
    split: SplitArrays,
    *,
    max_images: int = 0,
    batch_size: int = 256,
    shard_images: int = SHARD_IMAGES,
    out_path: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The (n_images, cpi * n_images) float32 score matrix of a split's first
    ``max_images`` images (0 = all), shard by shard in this process.

    Args:
        shard_images: images per shard (rounded to the encoding grid).
        out_path: stream the rows into this ``.npy`` (memory-mapped) instead of RAM.
        progress: called as ``progress(shards_done, n_shards)`` after every shard.
    """
    n_images = n_scored_images(split, max_images)
    shards = plan_score_shards(n_images, shard_images, batch_size)
    out = allocate_scores((n_images, split.captions_per_image * n_images), out_path)
    for done, shard in enumerate(shards, start=1):
        out[shard.start:shard.stop] = score_rows(model, split, shard.start, shard.stop,
                                                 n_images=n_images, batch_size=batch_size)
        if progress is not None:
            progress(done, len(shards))
    if isinstance(out, np.memmap):
        out.flush()
    return out


__all__ = ["SHARD_IMAGES", "allocate_scores", "n_scored_images", "plan_score_shards",
           "score_rows", "score_split"]
