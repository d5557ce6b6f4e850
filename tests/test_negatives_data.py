"""Offline sampling rule, versioned tables on disk, and batches with quintuplets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aoq.data import DataError
from aoq.training.batches import BatchRequest, EpochBatchSampler, PairDataset
from aoq.data.captions import TokenizedCaptions
from aoq.data.prepare import SplitArrays
from aoq.negatives.sampling import draw_offline, sampling_rng
from aoq.negatives.tables import list_versions, load_tables, save_tables


def random_tables(n_images: int, k_c: int, k_i: int, seed: int = 0):
    """Valid tables: positives excluded, rows of distinct ids."""
    rng = np.random.default_rng(seed)
    i2t = np.stack([rng.permutation(np.setdiff1d(np.arange(5 * n_images),
                                                  np.arange(5 * i, 5 * i + 5)))[:k_c]
                    for i in range(n_images)])
    t2i = np.stack([rng.permutation(np.setdiff1d(np.arange(n_images), [j // 5]))[:k_i]
                    for j in range(5 * n_images)]).astype(np.int32)
    return i2t, t2i


def test_draw_follows_the_authors_rule() -> None:
    i2t, t2i = random_tables(20, 30, 6)
    caps = np.arange(100)
    draw = draw_offline(caps, i2t, t2i, sampling_range=30, rng=np.random.default_rng(3))
    # Re-derive n from the caption negative's column and check the image negative used n//5.
    for j in range(100):
        n = int(np.where(i2t[j // 5] == draw.caption_negative[j])[0][0])
        assert n < 30
        assert draw.image_negative[j] == t2i[j, n // 5]
        assert draw.image_of_caption_negative[j] == draw.caption_negative[j] // 5
        assert draw.caption_of_image_negative[j] // 5 == draw.image_negative[j]
    assert not np.any(draw.image_of_caption_negative == caps // 5)
    assert not np.any(draw.image_negative == caps // 5)


def test_range_h_limits_the_columns_drawn() -> None:
    i2t, t2i = random_tables(20, 30, 6)
    draw = draw_offline(np.repeat(np.arange(100), 20), i2t, t2i, sampling_range=10,
                        rng=np.random.default_rng(0))
    cols = [int(np.where(i2t[j // 5] == c)[0][0])
            for j, c in zip(np.repeat(np.arange(100), 20), draw.caption_negative)]
    assert max(cols) == 9 and min(cols) == 0
    with pytest.raises(ValueError, match="does not fit"):
        draw_offline(np.arange(5), i2t, t2i, sampling_range=31, rng=np.random.default_rng(0))


def test_a_corrupt_table_that_returns_a_positive_is_caught() -> None:
    i2t, t2i = random_tables(10, 12, 3)
    i2t[0, :] = 2  # a caption of image 0
    with pytest.raises(AssertionError, match="corrupt i2t"):
        draw_offline(np.array([0, 1]), i2t, t2i, 12, np.random.default_rng(0))


def test_sampling_is_reproducible_per_seed_epoch_rank_step() -> None:
    a = sampling_rng(0, 3, 1, 7).integers(1 << 30, size=4)
    b = sampling_rng(0, 3, 1, 7).integers(1 << 30, size=4)
    c = sampling_rng(0, 3, 0, 7).integers(1 << 30, size=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_tables_round_trip_memory_mapped_with_metadata(tmp_path: Path) -> None:
    i2t, t2i = random_tables(12, 20, 5)
    path = save_tables(tmp_path, 1, i2t, t2i, epoch=3, source="unit test")
    save_tables(tmp_path, 2, i2t, t2i, epoch=4, source="unit test")
    assert list_versions(tmp_path) == [1, 2]
    loaded = load_tables(path, n_images=12)
    assert isinstance(loaded.i2t, np.memmap) and loaded.i2t.dtype == np.int64
    assert loaded.t2i.dtype == np.int32 and np.array_equal(loaded.t2i, t2i)
    assert loaded.meta["epoch"] == 3 and loaded.meta["k_captions"] == 20 and loaded.version == 1
    assert load_tables(tmp_path).version == 2  # a root means its latest version
    with pytest.raises(FileExistsError):
        save_tables(tmp_path, 2, i2t, t2i)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tables_with_bad_ids_or_other_data_are_refused(tmp_path: Path) -> None:
    i2t, t2i = random_tables(12, 20, 5)
    bad = i2t.copy()
    bad[7, 3] = 60  # only 60 captions: ids 0..59
    path = save_tables(tmp_path, 1, bad, t2i)
    with pytest.raises(DataError, match=r"i2t\[7, 3\] = 60 is out of range 0..59"):
        load_tables(path)
    good = save_tables(tmp_path, 2, i2t, t2i)
    with pytest.raises(DataError, match="belong to other data"):
        load_tables(good, n_images=13)
    (good / "i2t.npy").write_bytes(b"\x93NUMPY junk")
    with pytest.raises(DataError, match="i2t.npy"):
        load_tables(good)
    with pytest.raises(DataError, match="no candidate tables"):
        load_tables(tmp_path / "empty")


def tiny_split(n_images: int = 12) -> SplitArrays:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n_images, 4, 3)).astype(np.float32)
    lengths = 3 + (np.arange(5 * n_images) % 4)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.arange(offsets[-1], dtype=np.int32) % 50 + 4
    return SplitArrays(images, TokenizedCaptions(offsets, values), 5)


def test_batches_stack_anchors_negatives_and_their_positives() -> None:
    split = tiny_split()
    i2t, t2i = random_tables(12, 20, 5)
    from aoq.negatives.tables import CandidateTables

    ds = PairDataset(split, seed=1, rank=0, sampling_range=20,
                     tables=CandidateTables(i2t, t2i))
    req = BatchRequest(epoch=2, step=5, caption_ids=np.array([0, 7, 33, 59]))
    batch = ds.__getitems__(req)
    assert batch.n_blocks == 3 and batch.regions.shape == (12, 4, 3)
    assert batch.tokens.shape[0] == 12 and batch.image_ids.tolist() == [0, 1, 6, 11]
    draw = draw_offline(req.caption_ids, i2t, t2i, 20, sampling_rng(1, 2, 0, 5))
    expected_images = np.concatenate([[0, 1, 6, 11], draw.image_negative,
                                      draw.image_of_caption_negative])
    assert torch.equal(batch.regions, torch.from_numpy(split.images[expected_images]))
    expected_caps = np.concatenate([req.caption_ids, draw.caption_negative,
                                    draw.caption_of_image_negative])
    tokens, lengths = split.tokens.batch(expected_caps)
    assert torch.equal(batch.tokens, tokens) and torch.equal(batch.lengths, lengths)
    # Same request, same batch (a resumed run or another loader process).
    again = ds.__getitems__(req)
    assert torch.equal(again.regions, batch.regions)
    ds.set_tables(None)
    plain = ds.__getitems__(req)
    assert plain.n_blocks == 1 and plain.regions.shape[0] == 4


def test_epoch_sampler_shards_disjointly_and_reshuffles() -> None:
    shards = []
    for rank in range(2):
        s = EpochBatchSampler(103, 10, rank=rank, world=2, seed=4)
        s.set_epoch(1)
        batches = list(s)
        assert len(batches) == len(s) == 6
        assert all(b.epoch == 1 for b in batches) and [b.step for b in batches] == list(range(6))
        shards.append(np.concatenate([b.caption_ids for b in batches]))
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0]) & set(shards[1])
    s = EpochBatchSampler(103, 10, rank=0, world=2, seed=4)
    s.set_epoch(2)
    assert not np.array_equal(np.concatenate([b.caption_ids for b in s]), shards[0])


def test_encode_split_respects_max_images() -> None:
    from aoq.config import ModelConfig
    from aoq.models.encode import encode_split
    from aoq.evaluation.scoring import score_split
    from aoq.models import build_model

    split = tiny_split(12)
    model = build_model(ModelConfig(embed_dim=8, word_dim=8), 60, 3)
    images, captions = encode_split(model, split, max_images=5, batch_size=4)
    assert images.shape == (5, 8) and captions.shape == (25, 8)
    assert score_split(model, split, max_images=7, batch_size=3).shape == (7, 35)
