"""Sharded exact mining equals the single-pass tables, for any sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aoq.negatives import mine_candidates
from aoq.negatives.shards import mine_shard
from aoq.search import plan_shards


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


def test_shard_boundaries_follow_the_encoder_batch_grid() -> None:
    shards = plan_shards(4000, 8, align=256)
    assert shards[0].start == 0 and shards[-1].stop == 4000
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
    assert all(s.start % 256 == 0 for s in shards)
    assert len(plan_shards(300, 8, align=256)) == 2  # only two aligned blocks exist


def test_an_aligned_range_encodes_bit_identically_to_the_whole_split(tmp_path) -> None:
    from aoq.config import load_config
    from aoq.data.prepare import open_split, prepare_data
    from aoq.models.encode import encode_range, encode_split
    from aoq.models import build_model

    from conftest import SMALL_SCENES

    cfg = load_config(None, [*SMALL_SCENES, f"data.cache_dir={tmp_path}"])
    prepared = prepare_data(cfg.data, progress=False)
    split = open_split(prepared, "train")
    torch.manual_seed(0)
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim)
    images, captions = encode_split(model, split, batch_size=16)
    for shard in plan_shards(split.n_images, 5, align=16):
        part_i, part_c = encode_range(model, split, shard.start, shard.stop, batch_size=16)
        assert torch.equal(part_i, images[shard.start:shard.stop])
        assert torch.equal(part_c, captions[5 * shard.start:5 * shard.stop])
