"""Tests for aoq.negatives.mining: exact blocked top-K candidate tables (on aoq.search).

Everything runs the real engine on real arrays. The reference is the textbook one: the
full score matrix, own captions / own image set to -inf, a stable descending argsort per
row. Embeddings with small integer entries make every product exact in fp32 whatever the
summation order, so "exact" can be checked with ``==`` (and such data is full of ties,
which is what tie-breaking needs); random float data is checked against faiss and a
float64 reference up to ties.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from aoq.negatives import exact_topk, mine_candidates, overlap_at_k
from aoq.search import SearchOptions


# ----------------------------------------------------------------------------- helpers


def integer_embeddings(n_images: int, d: int, cpi: int = 5, low: int = -2, high: int = 3,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(low, high, (n_images, d)).astype(np.float32)
    captions = rng.integers(low, high, (cpi * n_images, d)).astype(np.float32)
    return images, captions


def float_embeddings(n_images: int, d: int, cpi: int = 5, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, d)).astype(np.float32)
    captions = rng.standard_normal((cpi * n_images, d)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    return images, captions


def reference_tables(images: np.ndarray, captions: np.ndarray, k_captions: int, k_images: int,
                     cpi: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: full float64 matrix, positives -inf, stable descending sort."""
    scores = images.astype(np.float64) @ captions.astype(np.float64).T
    n = images.shape[0]
    own = (np.arange(scores.shape[1])[None, :] // cpi) == np.arange(n)[:, None]
    scores[own] = -np.inf
    i2t = np.argsort(-scores, axis=1, kind="stable")[:, :k_captions]
    t2i = np.argsort(-scores.T, axis=1, kind="stable")[:, :k_images]
    return i2t, t2i


# ------------------------------------------------------------------ exactness and ties


@pytest.mark.parametrize(
    ("n_images", "d", "k_captions", "k_images", "block_rows", "tile_cols"),
    [
        (7, 4, 3, 2, None, None),         # tiny
        (40, 6, 35, 10, None, None),      # one tile, no sampling
        (40, 6, 195, 39, None, None),     # K at its maximum in both directions
        (120, 5, 60, 25, 32, 128),        # sampled thresholds, permuted visiting order
        (150, 3, 400, 60, 17, 96),        # odd blocks, many ties (d=3), large K
        (90, 8, 445, 89, 25, 64),         # maximum K with sampling on
    ],
)
def test_tables_equal_brute_force(n_images, d, k_captions, k_images, block_rows, tile_cols):
    images, captions = integer_embeddings(n_images, d, seed=n_images)
    ref_i2t, ref_t2i = reference_tables(images, captions, k_captions, k_images)
    stats: dict = {}
    i2t, t2i = mine_candidates(images, captions, k_captions, k_images, block_rows=block_rows,
                               tile_cols=tile_cols, stats=stats)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)
    assert stats["row_candidates"] > 0 and stats["col_candidates"] > 0


def test_dtypes_shapes_positives_and_order():
    n, cpi = 60, 5
    images, captions = float_embeddings(n, 16, seed=1)
    i2t, t2i = mine_candidates(images, captions, 50, 20, tile_cols=64)
    assert i2t.dtype == np.int64 and i2t.shape == (n, 50)
    assert t2i.dtype == np.int32 and t2i.shape == (cpi * n, 20)
    # Positives never appear.
    assert not np.any(i2t // cpi == np.arange(n)[:, None])
    assert not np.any(t2i == (np.arange(cpi * n) // cpi)[:, None])
    # Each row is a set of distinct ids, sorted by descending score.
    assert all(len(set(row)) == 50 for row in i2t)
    s64 = images.astype(np.float64) @ captions.astype(np.float64).T
    assert np.all(np.diff(np.take_along_axis(s64, i2t, 1), axis=1) <= 1e-6)
    assert np.all(np.diff(np.take_along_axis(s64.T, t2i.astype(np.int64), 1), axis=1) <= 1e-6)


def test_ties_broken_by_lower_index():
    # Every caption of images 3..9 duplicates caption 0; every image duplicates image 0,
    # so scores tie massively and only the index order can decide.
    rng = np.random.default_rng(3)
    n, cpi, d = 12, 5, 8
    images = np.repeat(rng.integers(-2, 3, (1, d)), n, axis=0).astype(np.float32)
    captions = rng.integers(-2, 3, (cpi * n, d)).astype(np.float32)
    captions[15:50] = captions[0]
    i2t, t2i = mine_candidates(images, captions, 40, 8, tile_cols=16)
    ref_i2t, ref_t2i = reference_tables(images, captions, 40, 8)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)
    # All images are identical: each caption's images are simply the lowest ids != own.
    for j in range(cpi * n):
        own = j // cpi
        expected = [i for i in range(n) if i != own][:8]
        assert t2i[j].tolist() == expected
    # Within a run of equal scores, ids ascend.
    scores = images[0].astype(np.float64) @ captions.astype(np.float64).T
    for row in i2t:
        s = scores[row]
        same = s[1:] == s[:-1]
        assert np.all(row[1:][same] > row[:-1][same])


def test_zero_and_negative_zero_scores_tie():
    # -0.0 and +0.0 are equal scores: their order must fall back to the index.
    images = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    captions = np.array([[0.0, 1.0], [-0.0, 2.0], [0.0, 3.0],
                         [-1.0, 0.0], [-0.0, -1.0], [0.0, -0.0]], dtype=np.float32)
    i2t, t2i = mine_candidates(images, captions, 3, 1, captions_per_image=3)
    ref_i2t, ref_t2i = reference_tables(images, captions, 3, 1, cpi=3)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)


@pytest.mark.parametrize("block_rows", [1, 3, 7, 50, 64, 1000])
def test_block_rows_do_not_change_results(block_rows):
    images, captions = integer_embeddings(50, 5, seed=7)
    expected = mine_candidates(images, captions, 30, 12, block_rows=16, tile_cols=64)
    got = mine_candidates(images, captions, 30, 12, block_rows=block_rows, tile_cols=96)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_float_data_matches_float64_reference_up_to_ties():
    images, captions = float_embeddings(80, 32, seed=5)
    i2t, t2i = mine_candidates(images, captions, 120, 30, block_rows=24, tile_cols=64)
    ref_i2t, ref_t2i = reference_tables(images, captions, 120, 30)
    s64 = images.astype(np.float64) @ captions.astype(np.float64).T
    for ours, ref, scores in ((i2t, ref_i2t, s64), (t2i.astype(np.int64), ref_t2i, s64.T)):
        a = np.take_along_axis(scores, ours, 1)
        b = np.take_along_axis(scores, ref, 1)
        # fp32 and fp64 may order scores closer than fp32 resolution differently.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert overlap_at_k(ours, ref) > 0.999


def test_numpy_and_torch_inputs_and_dtypes_agree():
    images, captions = integer_embeddings(30, 6, seed=11)
    expected = mine_candidates(images, captions, 20, 9)
    variants = [
        (torch.from_numpy(images), torch.from_numpy(captions)),
        (torch.from_numpy(images).requires_grad_(), torch.from_numpy(captions)),
        (images.astype(np.float16), captions.astype(np.float16)),   # exact: small ints
        (torch.from_numpy(images).bfloat16(), torch.from_numpy(captions).bfloat16()),
        (images.astype(np.float64), captions.astype(np.float64)),
        (images.astype(">f4"), captions),                              # big-endian
        (np.asfortranarray(images), captions[::1]),
    ]
    for img, cap in variants:
        got = mine_candidates(img, cap, 20, 9)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_read_only_inputs_are_accepted_without_warnings():
    images, captions = integer_embeddings(20, 4, seed=2)
    images.setflags(write=False)
    captions.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        i2t, _ = mine_candidates(images, captions, 10, 5)
    np.testing.assert_array_equal(i2t, reference_tables(images, captions, 10, 5)[0])


def test_recomputed_rows_and_columns_stay_exact():
    # A negative headroom puts every threshold too high, so most rows and columns have
    # fewer than K candidates and go through the full recomputation path.
    options = dataclasses.replace(SearchOptions(), z=-8.0)
    images, captions = integer_embeddings(100, 6, seed=13)
    stats: dict = {}
    i2t, t2i = mine_candidates(images, captions, 80, 30, block_rows=40, tile_cols=64,
                               stats=stats, options=options)
    assert stats["row_recomputed"] > 0 and stats["col_recomputed"] > 0
    ref_i2t, ref_t2i = reference_tables(images, captions, 80, 30)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)


def test_column_compaction_stays_exact():
    # Compact column candidates after every tile (raising thresholds as it goes).
    options = dataclasses.replace(SearchOptions(), column_cap_min=0, column_slack=0.0)
    images, captions = integer_embeddings(120, 5, seed=17)
    stats: dict = {}
    i2t, t2i = mine_candidates(images, captions, 40, 20, block_rows=16, tile_cols=128,
                               stats=stats, options=options)
    assert stats["compactions"] > 0
    ref_i2t, ref_t2i = reference_tables(images, captions, 40, 20)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)


def test_exact_topk_generic_directions_and_scores():
    images, captions = integer_embeddings(40, 5, seed=19)
    i2t, t2i = mine_candidates(images, captions, 25, 11)
    scores, ids = exact_topk(images, captions, 25, positives=(1, 5), tile_cols=64)
    np.testing.assert_array_equal(ids, i2t)
    assert scores.dtype == np.float32 and scores.shape == (40, 25)
    np.testing.assert_array_equal(scores, np.take_along_axis(images @ captions.T, ids, 1))
    _, ids_t = exact_topk(captions, images, 11, positives=(5, 1), block_rows=33)
    np.testing.assert_array_equal(ids_t, t2i)
    # No exclusion at all: plain top-k (ties by index).
    s, i = exact_topk(images, captions, 200)
    full = images.astype(np.float64) @ captions.astype(np.float64).T
    np.testing.assert_array_equal(i, np.argsort(-full, axis=1, kind="stable")[:, :200])
    # K = 0 is an empty table.
    _, empty = exact_topk(images, captions, 0)
    assert empty.shape == (40, 0)


def test_equal_to_faiss_up_to_ties():
    faiss = pytest.importorskip("faiss")
    n, cpi, k = 300, 5, 150
    images, captions = float_embeddings(n, 64, seed=23)
    index = faiss.IndexFlatIP(64)
    index.add(captions)
    _, ids = index.search(images, k + cpi)
    own = ids // cpi == np.arange(n)[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    theirs = np.take_along_axis(ids, order, 1)
    ours, _ = mine_candidates(images, captions, k, 10, block_rows=128, tile_cols=256)
    s64 = images.astype(np.float64) @ captions.astype(np.float64).T
    # Two fp32 GEMMs (MKL, faiss's BLAS) round differently: equal up to near-ties.
    np.testing.assert_allclose(np.take_along_axis(s64, ours, 1),
                               np.take_along_axis(s64, theirs, 1), rtol=0, atol=1e-6)
    assert overlap_at_k(ours, theirs) > 0.999
    assert np.mean(np.all(ours == theirs, axis=1)) > 0.8


def test_bf16_mode_overlap_is_high():
    images, captions = float_embeddings(200, 64, seed=29)
    exact = mine_candidates(images, captions, 100, 20, tile_cols=256)
    stats: dict = {}
    approx = mine_candidates(images, captions, 100, 20, tile_cols=256, precision="bf16",
                             stats=stats)
    assert approx[0].dtype == np.int64 and approx[1].dtype == np.int32
    assert approx[0].shape == exact[0].shape and approx[1].shape == exact[1].shape
    ov_i2t, ov_t2i = overlap_at_k(approx[0], exact[0]), overlap_at_k(approx[1], exact[1])
    assert ov_i2t > 0.95 and ov_t2i > 0.95, (ov_i2t, ov_t2i)
    assert not np.any(approx[0] // 5 == np.arange(200)[:, None])
    # Rows are still in descending (fp32) score order.
    s = images.astype(np.float64) @ captions.astype(np.float64).T
    assert np.all(np.diff(np.take_along_axis(s, approx[0], 1), axis=1) <= 1e-6)


def test_overlap_at_k():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    assert overlap_at_k(a, a[:, ::-1]) == 1.0
    assert overlap_at_k(a, np.array([[1, 2, 9], [7, 8, 9]])) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        overlap_at_k(a, a[:1])


def test_progress_bar_runs(capsys):
    images, captions = integer_embeddings(30, 4, seed=31)
    i2t, _ = mine_candidates(images, captions, 10, 5, block_rows=8, progress=True)
    np.testing.assert_array_equal(i2t, reference_tables(images, captions, 10, 5)[0])
    assert "mining" in capsys.readouterr().err


def test_zero_width_tables():
    images, captions = integer_embeddings(10, 4)
    i2t, t2i = mine_candidates(images, captions, 0, 0)
    assert i2t.shape == (10, 0) and i2t.dtype == np.int64
    assert t2i.shape == (50, 0) and t2i.dtype == np.int32
    i2t, t2i = mine_candidates(images, captions, 5, 0)
    np.testing.assert_array_equal(i2t, reference_tables(images, captions, 5, 0)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    images, captions = integer_embeddings(200, 16, seed=37)
    cpu = mine_candidates(images, captions, 100, 30, device="cpu", tile_cols=256)
    gpu = mine_candidates(images, captions, 100, 30, device="cuda", tile_cols=256)
    np.testing.assert_array_equal(cpu[0], gpu[0])
    np.testing.assert_array_equal(cpu[1], gpu[1])


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_captions": 46}, "k_captions=46 is larger than n_captions - captions_per_image"),
        ({"k_images": 10}, "k_images=10 is larger than n_images - 1"),
        ({"k_captions": -1}, "k_captions must be >= 0"),
        ({"k_images": 2.5}, "k_images must be an integer"),
        ({"captions_per_image": 4}, "expected captions_per_image"),
        ({"captions_per_image": 0}, "captions_per_image must be >= 1"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"block_rows": 0}, "block_rows must be >= 1"),
        ({"tile_cols": 0}, "tile_cols must be >= 1"),
    ],
)
def test_validation_errors(kwargs, message):
    images, captions = integer_embeddings(10, 4)
    args = {"k_captions": 5, "k_images": 3, "captions_per_image": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        mine_candidates(images, captions, args.pop("k_captions"), args.pop("k_images"),
                        args.pop("captions_per_image"), **args)


def test_validation_of_arrays():
    images, captions = integer_embeddings(10, 4)
    with pytest.raises(ValueError, match="2-D"):
        mine_candidates(images[0], captions, 5, 3)
    with pytest.raises(ValueError, match="no rows"):
        mine_candidates(images[:0], captions[:0], 0, 0)
    with pytest.raises(ValueError, match="dimension"):
        mine_candidates(images, captions[:, :3], 5, 3)
    with pytest.raises(ValueError, match="expected captions_per_image"):
        mine_candidates(images, captions[:-1], 5, 3)
    with pytest.raises(ValueError, match="float"):
        mine_candidates(images.astype(np.int64), captions, 5, 3)
    with pytest.raises(ValueError, match="float"):
        mine_candidates(torch.ones(10, 4, dtype=torch.int32), captions, 5, 3)
    bad = captions.copy()
    bad[17, 2] = np.nan
    with pytest.raises(ValueError, match="caption_emb has a non-finite value .*row 17"):
        mine_candidates(images, bad, 5, 3)
    bad = images.copy()
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match="image_emb has a non-finite value .*row 3"):
        mine_candidates(bad, captions, 5, 3)
    with pytest.raises(ValueError, match="positives"):
        exact_topk(images, captions, 3, positives=(1,))
    with pytest.raises(ValueError, match="k=50 is larger"):
        exact_topk(images, captions, 50, positives=(1, 5))


@pytest.mark.parametrize(("workers", "threads"), [(False, 2), (True, 1), (True, 2), (True, 3)])
def test_worker_modes_agree(workers, threads):
    # CPU runs one single-threaded worker per torch thread; False (and CUDA) one worker
    # on the calling thread.
    options = dataclasses.replace(SearchOptions(), use_workers=workers)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        images, captions = integer_embeddings(90, 6, seed=41)
        stats: dict = {}
        got = mine_candidates(images, captions, 70, 20, block_rows=16, tile_cols=128,
                              stats=stats, options=options)
        assert stats["workers"] == (threads if workers else 1)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
    ref = reference_tables(images, captions, 70, 20)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


def test_caller_thread_setting_is_left_alone():
    before = torch.get_num_threads()
    images, captions = integer_embeddings(40, 4, seed=43)
    mine_candidates(images, captions, 30, 10, block_rows=8, tile_cols=64)
    assert torch.get_num_threads() == before
