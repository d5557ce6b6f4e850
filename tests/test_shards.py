"""Sharded exact mining equals the single-pass tables, for any sharding."""

from __future__ import annotations

import numpy as np
import pytest

from aoq.negatives import mine_candidates
from aoq.negatives.shards import mine_shard, plan_shards


def embeddings(n_images: int, dim: int, seed: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, dim)).astype(np.float32)
    captions = rng.normal(size=(5 * n_images, dim)).astype(np.float32)
    if ties:  # duplicate rows force equal scores
        captions[7] = captions[3]
        captions[40:45] = captions[10:15]
        images[9] = images[2]
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    return images, captions


@pytest.mark.parametrize("n_shards", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("ties", [False, True])
def test_sharded_tables_equal_single_pass(n_shards: int, ties: bool) -> None:
    images, captions = embeddings(40, 16, seed=n_shards, ties=ties)
    i2t, t2i = mine_candidates(images, captions, 60, 12)
    pieces = [mine_shard(s, images, captions, 60, 12) for s in plan_shards(40, n_shards)]
    assert np.array_equal(np.concatenate([p[0] for p in pieces]), i2t)
    assert np.array_equal(np.concatenate([p[1] for p in pieces]), t2i)
    assert pieces[0][0].dtype == np.int64 and pieces[0][1].dtype == np.int32


def test_maximal_k_still_exact() -> None:
    images, captions = embeddings(12, 8, seed=5)
    i2t, t2i = mine_candidates(images, captions, 55, 11)
    pieces = [mine_shard(s, images, captions, 55, 11) for s in plan_shards(12, 5)]
    assert np.array_equal(np.concatenate([p[0] for p in pieces]), i2t)
    assert np.array_equal(np.concatenate([p[1] for p in pieces]), t2i)


def test_plan_covers_every_image_once() -> None:
    shards = plan_shards(103, 8)
    assert shards[0].start == 0 and shards[-1].stop == 103
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
    assert len(plan_shards(3, 10)) == 3
