"""The miner options (range_min, the score-margin filter) and the per-term loss weights,
each against a direct computation; their config checks and their Tune space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aoq.config import ConfigError, load_config
from aoq.config.tune_space import load_space
from aoq.losses import AOQLoss, OfflineScores
from aoq.negatives import mine_candidates
from aoq.negatives.filters import filter_rows
from aoq.negatives.sampling import draw_offline, sampling_rng
from aoq.negatives.shards import mine_shard
from aoq.search import plan_shards

CPI = 5


def embeddings(n_images: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, dim)).astype(np.float32)
    # Captions near their image, so positives usually (not always) beat candidates.
    captions = (np.repeat(images, CPI, axis=0)
                + 1.2 * rng.normal(size=(CPI * n_images, dim))).astype(np.float32)
    return images, captions


def filtered_by_hand(images, captions, k_captions, k_images, margin):
    """The filtered tables from the full score matrix, row by row, by the module's rule:
    keep candidates scoring below the positive minus the margin, in score order (ties
    by index), then repeat the kept ones to fill the width."""
    scores = images.astype(np.float64) @ captions.T.astype(np.float64)
    n_images = images.shape[0]

    def fill(kept, ranked, width):
        if not kept:  # nothing to draw from: the row stays as mined
            return ranked
        return [kept[p] if p < len(kept) else kept[p % len(kept)] for p in range(width)]

    i2t = []
    for i in range(n_images):
        own = range(CPI * i, CPI * i + CPI)
        positive = np.mean([scores[i, c] for c in own])
        ranked = sorted((c for c in range(CPI * n_images) if c not in own),
                        key=lambda c: (-scores[i, c], c))[:k_captions]
        i2t.append(fill([c for c in ranked if scores[i, c] < positive - margin], ranked,
                        k_captions))
    t2i = []
    for j in range(CPI * n_images):
        positive = scores[j // CPI, j]
        ranked = sorted((i for i in range(n_images) if i != j // CPI),
                        key=lambda i: (-scores[i, j], i))[:k_images]
        t2i.append(fill([i for i in ranked if scores[i, j] < positive - margin], ranked,
                        k_images))
    return np.array(i2t), np.array(t2i)


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_score_filter_equals_the_rule_computed_by_hand(margin: float) -> None:
    images, captions = embeddings(40)
    i2t, t2i = mine_candidates(images, captions, 60, 12, CPI, score_margin=margin)
    want_i2t, want_t2i = filtered_by_hand(images, captions, 60, 12, margin)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    plain_i2t, _ = mine_candidates(images, captions, 60, 12, CPI)
    assert not np.array_equal(i2t, plain_i2t)  # the filter dropped something here


def test_sharded_filtered_mining_equals_one_pass() -> None:
    images, captions = embeddings(50, seed=1)
    whole = mine_candidates(images, captions, 30, 9, CPI, score_margin=0.2)
    pieces = [mine_shard(s, images, captions, 30, 9, CPI, score_margin=0.2)
              for s in plan_shards(50, 3)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), whole[0])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), whole[1])


def test_filter_rows_fills_short_rows_and_leaves_empty_rows() -> None:
    ids = np.array([[7, 3, 9, 4], [1, 2, 5, 6], [8, 0, 2, 3]])
    scores = np.array([[0.9, 0.5, 0.8, 0.1], [0.9, 0.9, 0.9, 0.9], [0.2, 0.1, 0.0, -0.1]])
    out, stats = filter_rows(ids, scores, np.array([0.85, 0.5, 1.0]), margin=0.1)
    # Row 0 keeps 3 (0.5) and 4 (0.1) below 0.75, in order, then repeats them.
    assert out[0].tolist() == [3, 4, 3, 4]
    assert out[1].tolist() == [1, 2, 5, 6]  # nothing kept: unfiltered, counted
    assert out[2].tolist() == [8, 0, 2, 3]  # everything kept
    assert stats == {"dropped": 2, "short_rows": 1, "unfiltered_rows": 1}


def test_range_min_draws_only_from_ranks_range_min_to_h() -> None:
    rng = np.random.default_rng(0)
    n_images, k = 30, 40
    i2t = np.array([rng.permutation([c for c in range(CPI * n_images)
                                     if c // CPI != i])[:k] for i in range(n_images)])
    t2i = np.array([rng.permutation([i for i in range(n_images) if i != j // CPI])[:k]
                    for j in range(CPI * n_images)])
    caps = np.arange(CPI * n_images)
    draw = draw_offline(caps, i2t, t2i, 20, sampling_rng(3, 1, 0, 2), CPI, range_min=7)
    # Direct: the same generator draws n ~ U{7..19}, then the offsets.
    g = sampling_rng(3, 1, 0, 2)
    n = g.integers(7, 20, size=len(caps))
    assert n.min() >= 7
    np.testing.assert_array_equal(draw.caption_negative, i2t[caps // CPI, n])
    np.testing.assert_array_equal(draw.image_negative, t2i[caps, n // CPI])
    with pytest.raises(ValueError, match="range_min"):
        draw_offline(caps, i2t, t2i, 20, sampling_rng(0, 0, 0, 0), CPI, range_min=20)


def test_term_weights_scale_the_offline_terms_by_direct_computation() -> None:
    scores = torch.tensor([[0.9, 0.2, 0.7], [0.6, 0.5, 0.1], [0.3, 0.4, 0.8]],
                          dtype=torch.float64)
    off = OfflineScores(torch.tensor([0.95, 0.1, 0.2], dtype=torch.float64),
                        torch.tensor([0.5, 0.7, 0.1], dtype=torch.float64),
                        torch.tensor([0.92, 0.3, 0.85], dtype=torch.float64),
                        torch.tensor([0.1, 0.6, 0.81], dtype=torch.float64))
    pos = [0.9, 0.5, 0.8]

    def hinge_sum(values):
        return sum(max(0.0, float(v) - p) for v, p in zip(values, pos))

    online = 0.3 + 0.2  # test_losses.py works these out by hand for the same matrix
    tri = hinge_sum(off.image_caption_off) + hinge_sum(off.image_off_caption)
    quin = hinge_sum(off.image_off_caption_off) + hinge_sum(off.positives_of_offline)
    loss_fn = AOQLoss("offquin", offline_triplet_weight=0.25, quintuplet_weight=3.0)
    assert float(loss_fn(scores, off)) == pytest.approx(online + 0.25 * tri + 3.0 * quin)
    # The logged terms stay unweighted, comparable across weightings.
    assert float(loss_fn.last_terms["offline_caption_negative"]) == pytest.approx(0.05)
    assert float(AOQLoss("offquin")(scores, off)) == pytest.approx(online + tri + quin)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        AOQLoss("aoq", quintuplet_weight=-1.0)


def test_config_carries_the_options_and_refuses_range_min_at_or_above_h() -> None:
    cfg = load_config(None, ["negatives.range_min=5", "negatives.score_filter=true",
                             "negatives.score_margin=0.05", "loss.quintuplet_weight=0.5"])
    assert AOQLoss.from_config(cfg.loss).term_weights["quintuplet_positive_pair"] == 0.5
    assert (cfg.negatives.range_min, cfg.negatives.score_margin) == (5, 0.05)
    with pytest.raises(ConfigError, match="negatives.range_min=300: must be <"):
        load_config(None, ["negatives.range_min=300"])


def test_the_negative_options_space_validates() -> None:
    space = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" /
                       "negative_options.yaml")
    assert {p.key for p in space.params} == {
        "negatives.range_min", "negatives.score_filter", "negatives.score_margin",
        "loss.offline_triplet_weight", "loss.quintuplet_weight"}
