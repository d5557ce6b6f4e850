"""Tests for aoq.evaluation: retrieval metrics (docs/architecture.md, "Evaluation") and plots.

Every check runs the real code on real arrays; the reference implementation below is the
textbook per-query stable argsort, written independently of the library's counting.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import aoq.evaluation.metrics as metrics_module
from aoq.evaluation import (
    format_metrics_table,
    plot_histograms,
    plot_recall_curves,
    ranks_i2t,
    ranks_t2i,
    recall_curve,
    retrieval_metrics,
)

KEYS = [
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "i2t_medr",
    "i2t_meanr",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "t2i_medr",
    "t2i_meanr",
    "rsum",
]
RECALL_KEYS = [k for k in KEYS if "_r" in k and "med" not in k and "mean" not in k]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ reference


def reference_ranks(s: np.ndarray, cpi: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per-query loop with a stable descending argsort (what the field's code does)."""
    s = np.asarray(s, dtype=np.float64)
    n_images, n_captions = s.shape
    i2t = np.empty(n_images, dtype=np.int64)
    for i in range(n_images):
        order = np.argsort(-s[i], kind="stable")
        i2t[i] = min(int(np.where(order == j)[0][0]) for j in range(cpi * i, cpi * i + cpi))
    t2i = np.empty(n_captions, dtype=np.int64)
    for j in range(n_captions):
        order = np.argsort(-s[:, j], kind="stable")
        t2i[j] = int(np.where(order == j // cpi)[0][0])
    return i2t, t2i


def reference_metrics(s: np.ndarray, folds: int = 1, cpi: int = 5) -> dict[str, float]:
    s = np.asarray(s, dtype=np.float64)
    size = s.shape[0] // folds
    per_fold = []
    for f in range(folds):
        sub = s[f * size : (f + 1) * size, f * size * cpi : (f + 1) * size * cpi]
        i2t, t2i = reference_ranks(sub, cpi)
        m = {}
        for name, r in (("i2t", i2t), ("t2i", t2i)):
            for k in (1, 5, 10):
                m[f"{name}_r{k}"] = 100.0 * len(np.where(r < k)[0]) / len(r)
            m[f"{name}_medr"] = np.floor(np.median(r)) + 1
            m[f"{name}_meanr"] = r.mean() + 1
        per_fold.append(m)
    out = {k: float(np.mean([m[k] for m in per_fold])) for k in KEYS if k != "rsum"}
    out["rsum"] = sum(out[k] for k in RECALL_KEYS)
    return out


def assert_metrics_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == KEYS
    for key in KEYS:
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


# ------------------------------------------------------------------ hand-made case


def hand_matrix() -> np.ndarray:
    """3 images x 15 captions; row r is ``base_r + r / 10`` so no column has ties."""
    base = np.array(
        [
            # image 0: own captions 0..4. Caption 0 scores worst in the row (rank 14) but
            # caption 3 scores best (rank 0): best-of-5 gives image 0 rank 0.
            [1, 2, 3, 15, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
            # image 1: own captions 5..9. Order: c0 (15), c14 (14), c6 (13) -> rank 2.
            [15, 1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 10, 11, 12, 14],
            # image 2: own captions 10..14. Order: c9 (15), c12 (14) -> rank 1.
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 10, 11, 14, 12, 13],
        ],
        dtype=np.float64,
    )
    return base + np.arange(3)[:, None] / 10


# i2t ranks: [0, 2, 1].
HAND_I2T = [0, 2, 1]
# t2i, column j = (img0, img1, img2) scores, correct image j // 5, rank = #greater:
#  c0 (1, 15.1, 1.2) img0 -> 2    c5 (5, 5.1, 6.2)   img1 -> 1    c10 (10, 9.1, 10.2)  img2 -> 0
#  c1 (2, 1.1, 2.2)  img0 -> 1    c6 (6, 13.1, 7.2)  img1 -> 0    c11 (11, 10.1, 11.2) img2 -> 0
#  c2 (3, 2.1, 3.2)  img0 -> 1    c7 (7, 6.1, 8.2)   img1 -> 2    c12 (12, 11.1, 14.2) img2 -> 0
#  c3 (15, 3.1, 4.2) img0 -> 0    c8 (8, 7.1, 9.2)   img1 -> 2    c13 (13, 12.1, 12.2) img2 -> 1
#  c4 (4, 4.1, 5.2)  img0 -> 2    c9 (9, 8.1, 15.2)  img1 -> 2    c14 (14, 14.1, 13.2) img2 -> 2
HAND_T2I = [2, 1, 1, 0, 2, 1, 0, 2, 2, 2, 0, 0, 0, 1, 2]


def test_hand_made_ranks_and_every_metric() -> None:
    s = hand_matrix()
    np.testing.assert_array_equal(ranks_i2t(s), HAND_I2T)
    np.testing.assert_array_equal(ranks_t2i(s), HAND_T2I)
    assert ranks_i2t(s).dtype == np.int64 and ranks_t2i(s).dtype == np.int64

    m = retrieval_metrics(s)
    assert list(m) == KEYS
    # i2t ranks [0, 2, 1]: one of three below 1, all below 5 and 10;
    # median 1 -> medr 2; mean 1 -> meanr 2.
    assert m["i2t_r1"] == pytest.approx(100 / 3, rel=1e-15)
    assert m["i2t_r5"] == 100.0
    assert m["i2t_r10"] == 100.0
    assert m["i2t_medr"] == 2.0
    assert m["i2t_meanr"] == 2.0
    # t2i ranks: five 0s (c3 c6 c10 c11 c12), four 1s, six 2s. R@1 = 5/15; the 8th of 15
    # sorted ranks is 1 -> medr 2; mean (4 + 12) / 15 -> meanr 1 + 16/15.
    assert m["t2i_r1"] == pytest.approx(100 / 3, rel=1e-15)
    assert m["t2i_r5"] == 100.0
    assert m["t2i_r10"] == 100.0
    assert m["t2i_medr"] == 2.0
    assert m["t2i_meanr"] == pytest.approx(1 + 16 / 15, rel=1e-15)
    assert m["rsum"] == pytest.approx(2 * (100 / 3) + 4 * 100, rel=1e-15)


def test_best_of_five_not_first_caption() -> None:
    # Only caption 3 of image 0 is on top; its first caption is last. A "first caption"
    # implementation would give rank 14.
    s = hand_matrix()
    assert int(np.argsort(-s[0], kind="stable").tolist().index(0)) == 14
    assert ranks_i2t(s)[0] == 0


# ------------------------------------------------------------------ ties


def test_constant_matrix_ties_go_to_lower_index() -> None:
    n = 4
    s = np.zeros((n, 5 * n), dtype=np.float32)
    # Every caption ties: image i's first own caption 5i sits after the 5i lower-indexed
    # captions; caption j's image j//5 sits after the j//5 lower-indexed images.
    np.testing.assert_array_equal(ranks_i2t(s), 5 * np.arange(n))
    np.testing.assert_array_equal(ranks_t2i(s), np.arange(5 * n) // 5)


def test_partial_ties_follow_stable_rule() -> None:
    s = np.zeros((2, 10))
    # image 0: own c0 ties with foreign c7 (higher index) at the top -> rank 0.
    s[0, 0] = s[0, 7] = 0.5
    # image 1: best own c5 and c7 tie with foreign c2 (lower index) -> c2 first, rank 1;
    # the lower-indexed own caption (c5) is the one that counts.
    s[1, 2] = s[1, 5] = s[1, 7] = 1.0
    np.testing.assert_array_equal(ranks_i2t(s), [0, 1])
    # Columns (image 0, image 1), correct image j // 5:
    # c0 (0.5, 0) -> 0; c2 (0, 1): image 1 above image 0 -> 1; c5 (0, 1) -> 0;
    # c7 (0.5, 1) -> 0. The rest are (0, 0) ties, where image 0 (lower index) comes
    # first: rank 0 for captions of image 0 (c1 c3 c4), 1 for image 1's (c6 c8 c9).
    want_t2i = [0, 0, 1, 0, 0, 0, 1, 0, 1, 1]
    np.testing.assert_array_equal(ranks_t2i(s), want_t2i)
    np.testing.assert_array_equal(ranks_t2i(s), reference_ranks(s)[1])
    np.testing.assert_array_equal(ranks_i2t(s), reference_ranks(s)[0])


# ------------------------------------------------------------------ reference cross-check


@pytest.mark.parametrize("folds", [1, 5])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(folds: int, ties: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 30
    s = rng.standard_normal((n, 5 * n))
    s += 1.5 * (np.arange(5 * n)[None, :] // 5 == np.arange(n)[:, None])  # some hits
    if ties:
        s = np.round(s, 1)  # many exact ties, rows and columns
    assert_metrics_close(retrieval_metrics(s, folds=folds), reference_metrics(s, folds))


def test_multi_block_counting_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny block size forces many row/column blocks and the tie-fix paths in each.
    monkeypatch.setattr(metrics_module, "_BLOCK_ELEMENTS", 37)
    rng = np.random.default_rng(7)
    s = np.round(rng.standard_normal((17, 85)), 1)
    want_i2t, want_t2i = reference_ranks(s)
    np.testing.assert_array_equal(ranks_i2t(s), want_i2t)
    np.testing.assert_array_equal(ranks_t2i(s), want_t2i)


def test_captions_per_image_keyword() -> None:
    rng = np.random.default_rng(3)
    s = np.round(rng.standard_normal((10, 20)), 1)
    assert_metrics_close(
        retrieval_metrics(s, captions_per_image=2), reference_metrics(s, 1, cpi=2)
    )
    assert_metrics_close(
        retrieval_metrics(s, folds=5, captions_per_image=2), reference_metrics(s, 5, cpi=2)
    )
    np.testing.assert_array_equal(ranks_i2t(s, 2), reference_ranks(s, 2)[0])
    np.testing.assert_array_equal(ranks_t2i(s, captions_per_image=2), reference_ranks(s, 2)[1])


# ------------------------------------------------------------------ 5-fold protocol


def test_five_folds_average_per_fold_results() -> None:
    rng = np.random.default_rng(11)
    n, folds = 50, 5
    s = rng.standard_normal((n, 5 * n)).astype(np.float32)
    # Make folds differ, and i2t differ from t2i, so a wrong rsum cannot pass by luck.
    s += np.linspace(0.5, 3.0, n)[:, None] * (np.arange(5 * n)[None, :] // 5 == np.arange(n)[:, None])
    got = retrieval_metrics(s, folds=folds)
    size = n // folds
    per_fold = [
        retrieval_metrics(s[f * size : (f + 1) * size, 5 * f * size : 5 * (f + 1) * size])
        for f in range(folds)
    ]
    for key in KEYS:
        assert got[key] == pytest.approx(np.mean([m[key] for m in per_fold]), rel=1e-12), key
    assert got["rsum"] == pytest.approx(sum(got[k] for k in RECALL_KEYS), rel=1e-15)
    # The widespread bug: 6 x the mean i2t recall. It must differ here.
    wrong = 6 * np.mean([got["i2t_r1"], got["i2t_r5"], got["i2t_r10"]])
    assert not math.isclose(got["rsum"], wrong, rel_tol=1e-6)
    # Folds see only their own captions, so the result differs from scoring all at once.
    assert got != retrieval_metrics(s, folds=1)


# ------------------------------------------------------------------ input kinds


def test_numpy_and_torch_inputs_agree() -> None:
    rng = np.random.default_rng(5)
    s = np.round(rng.standard_normal((20, 100)), 2).astype(np.float32)
    want = retrieval_metrics(s, folds=5)
    assert retrieval_metrics(torch.from_numpy(s), folds=5) == want
    assert retrieval_metrics(torch.from_numpy(s).double(), folds=5) == want
    assert retrieval_metrics(s.astype(np.float64), folds=5) == want
    assert retrieval_metrics(np.asfortranarray(s), folds=5) == want
    # A tensor that requires grad (straight out of a model) is fine too.
    assert retrieval_metrics(torch.from_numpy(s).requires_grad_(), folds=5) == want
    ro = s.copy()
    ro.setflags(write=False)
    assert retrieval_metrics(ro, folds=5) == want


@pytest.mark.parametrize("dtype", ["numpy16", "torch16", "bfloat16"])
def test_half_precision_inputs(dtype: str) -> None:
    rng = np.random.default_rng(9)
    s = rng.standard_normal((20, 100))
    if dtype == "numpy16":
        x = s.astype(np.float16)
        exact = x.astype(np.float64)
    else:
        x = torch.from_numpy(s).to(torch.float16 if dtype == "torch16" else torch.bfloat16)
        exact = x.double().numpy()
    # Widening half to float64 is exact, so the reference sees the very same ties.
    assert_metrics_close(retrieval_metrics(x, folds=5), reference_metrics(exact, 5))
    np.testing.assert_array_equal(ranks_i2t(x), reference_ranks(exact)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor_matches_cpu() -> None:
    rng = np.random.default_rng(4)
    s = torch.from_numpy(np.round(rng.standard_normal((40, 200)), 1))
    assert retrieval_metrics(s.cuda(), folds=5) == retrieval_metrics(s, folds=5)
    assert retrieval_metrics(s.cuda().half()) == retrieval_metrics(s.half())


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("scores", "kwargs", "match"),
    [
        (np.zeros(15), {}, "2-D"),
        (np.zeros((3, 15, 1)), {}, "2-D"),
        (np.zeros((3, 14)), {}, "5 captions per image"),
        (np.zeros((3, 3)), {}, "15 columns"),
        (np.zeros((0, 0)), {}, "no images"),
        (np.zeros((3, 15)), {"captions_per_image": 0}, "captions_per_image"),
        (np.zeros((3, 15)), {"folds": 2}, "does not divide"),
        (np.zeros((3, 15)), {"folds": 0}, "folds"),
        (np.zeros((3, 15), dtype=bool), {}, "real numbers"),
        (np.array([["a"] * 15] * 3), {}, "real numbers"),
    ],
)
def test_validation_errors(scores: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(scores, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_rejected_with_position(bad: float) -> None:
    s = np.zeros((3, 15), dtype=np.float32)
    s[2, 11] = bad
    for fn in (retrieval_metrics, ranks_i2t, ranks_t2i):
        with pytest.raises(ValueError, match=r"finite: scores\[2, 11\]"):
            fn(s)
    with pytest.raises(ValueError, match="finite"):
        retrieval_metrics(torch.from_numpy(s).half())


def test_single_image() -> None:
    m = retrieval_metrics(np.array([[0.1, 0.5, 0.2, 0.3, 0.4]]))
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0 and m["rsum"] == 600.0


# ------------------------------------------------------------------ perfect scores


@pytest.mark.parametrize("folds", [1, 5])
def test_perfect_scores(folds: int) -> None:
    n = 25
    s = (np.arange(5 * n)[None, :] // 5 == np.arange(n)[:, None]).astype(np.float32)
    m = retrieval_metrics(s, folds=folds)
    for key in RECALL_KEYS:
        assert m[key] == 100.0
    for key in ("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"):
        assert m[key] == 1.0
    assert m["rsum"] == 600.0


# ------------------------------------------------------------------ recall curve


def test_recall_curve_monotone_and_matches_recalls() -> None:
    rng = np.random.default_rng(2)
    s = rng.standard_normal((40, 200))
    s += 1.0 * (np.arange(200)[None, :] // 5 == np.arange(40)[:, None])
    m = retrieval_metrics(s)
    for name, ranks in (("i2t", ranks_i2t(s)), ("t2i", ranks_t2i(s))):
        curve = recall_curve(ranks, max_k=300)
        assert curve.shape == (300,) and curve.dtype == np.float64
        assert np.all(np.diff(curve) >= 0)
        assert curve[-1] == 100.0  # every rank is below 300 here
        for k in (1, 5, 10):
            assert curve[k - 1] == m[f"{name}_r{k}"]
    np.testing.assert_array_equal(recall_curve(np.array([0, 2, 2, 7]), max_k=3), [25.0, 25.0, 75.0])


def test_recall_curve_validation() -> None:
    with pytest.raises(ValueError, match="max_k"):
        recall_curve(np.array([0, 1]), max_k=0)
    with pytest.raises(ValueError, match=">= 0"):
        recall_curve(np.array([-1, 1]))
    with pytest.raises(ValueError, match="integers"):
        recall_curve(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        recall_curve(np.zeros((2, 2), dtype=np.int64))


# ------------------------------------------------------------------ table


def test_format_metrics_table() -> None:
    m = retrieval_metrics(hand_matrix())
    text = format_metrics_table(m, title="COCO 1K")
    lines = text.splitlines()
    assert lines[0] == "COCO 1K"
    assert lines[1].split() == ["R@1", "R@5", "R@10", "medr", "meanr"]
    assert lines[2].split() == ["i2t", "33.33", "100.00", "100.00", "2.00", "2.00"]
    assert lines[3].split() == ["t2i", "33.33", "100.00", "100.00", "2.00", "2.07"]
    assert lines[4].split() == ["rsum", "466.67"]
    # Fixed width: the columns line up.
    assert len({len(line) for line in lines[1:4]}) == 1
    assert format_metrics_table(m).splitlines()[0].split()[0] == "R@1"
    with pytest.raises(ValueError, match="rsum"):
        format_metrics_table({k: v for k, v in m.items() if k != "rsum"})


# ------------------------------------------------------------------ plots


def test_plot_recall_curves_writes_png(tmp_path: os.PathLike) -> None:
    s = hand_matrix()
    path = tmp_path / "recall.png"
    plot_recall_curves(
        {"i2t": recall_curve(ranks_i2t(s), 20), "t2i": recall_curve(ranks_t2i(s), 20)}, path
    )
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recall.png"]  # no temp left
    # Overwriting an existing file goes through the same atomic replace.
    plot_recall_curves({"i2t": np.linspace(10, 90, 100)}, str(path))
    assert path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="empty"):
        plot_recall_curves({}, path)
    with pytest.raises(FileNotFoundError):
        plot_recall_curves({"i2t": np.ones(3)}, tmp_path / "missing" / "x.png")


def test_plot_histograms_writes_png(tmp_path: os.PathLike) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "hardness.png"
    plot_histograms(
        {"online": rng.normal(0.2, 0.1, 500), "offline": rng.normal(0.5, 0.1, 200)},
        path,
        xlabel="S(I, T_neg)",
        title="negative hardness",
    )
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hardness.png"]
    with pytest.raises(ValueError, match="non-finite"):
        plot_histograms({"x": np.array([0.0, np.nan])}, path, xlabel="x", title="t")


def test_import_has_no_matplotlib_side_effect() -> None:
    code = "import sys, aoq.evaluation; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
