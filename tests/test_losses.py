"""AOQ loss family against direct, loop-by-loop computations of docs/architecture.md, "The method"."""

from __future__ import annotations

import pytest
import torch

from aoq.losses import TERM_NAMES, AOQLoss, OfflineScores


def reference_online(scores: torch.Tensor, margin: float, max_violation: bool,
                     not_negative: torch.Tensor | None = None):
    """Per-anchor online costs, written as plain loops."""
    b = scores.shape[0]
    if not_negative is None:
        not_negative = torch.eye(b, dtype=torch.bool)
    img, cap = [], []
    for k in range(b):
        ci = [max(0.0, margin + float(scores[k, j]) - float(scores[k, k]))
              for j in range(b) if not not_negative[k, j]]
        ct = [max(0.0, margin + float(scores[j, k]) - float(scores[k, k]))
              for j in range(b) if not not_negative[j, k]]
        agg = max if max_violation else sum
        img.append(agg(ci) if ci else 0.0)
        cap.append(agg(ct) if ct else 0.0)
    return torch.tensor(img, dtype=torch.float64), torch.tensor(cap, dtype=torch.float64)


def hand_scores() -> torch.Tensor:
    # Anchor 0's hardest caption is column 2 (0.7), its hardest image row 1 (0.6).
    return torch.tensor([[0.9, 0.2, 0.7],
                         [0.6, 0.5, 0.1],
                         [0.3, 0.4, 0.8]], dtype=torch.float64)


def hand_offline() -> OfflineScores:
    return OfflineScores(
        image_caption_off=torch.tensor([0.95, 0.1, 0.2], dtype=torch.float64),
        image_off_caption=torch.tensor([0.5, 0.7, 0.1], dtype=torch.float64),
        image_off_caption_off=torch.tensor([0.92, 0.3, 0.85], dtype=torch.float64),
        positives_of_offline=torch.tensor([0.1, 0.6, 0.81], dtype=torch.float64),
    )


def test_triplet_max_violation_by_hand() -> None:
    s = hand_scores()
    loss_fn = AOQLoss("triplet", margin_online=0.2, max_violation=True)
    loss = loss_fn(s)
    # image anchors: k0 [0.2+0.7-0.9]=0.0, k1 [0.2+0.6-0.5]=0.3, k2 [0.2+0.4-0.8]=0
    # caption anchors: k0 [0.2+0.6-0.9]=0, k1 [0.2+0.4-0.5]=0.1, k2 [0.2+0.7-0.8]=0.1
    assert float(loss_fn.last_terms["online_image_anchor"]) == pytest.approx(0.3)
    assert float(loss_fn.last_terms["online_caption_anchor"]) == pytest.approx(0.2)
    assert float(loss) == pytest.approx(0.5)


@pytest.mark.parametrize("max_violation", [True, False])
def test_triplet_matches_loops_on_random_scores(max_violation: bool) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(9, 9, generator=g, dtype=torch.float64) * 2 - 1
    loss_fn = AOQLoss("triplet", margin_online=0.2, max_violation=max_violation)
    img, cap = reference_online(s, 0.2, max_violation)
    assert float(loss_fn(s)) == pytest.approx(float(img.sum() + cap.sum()))


def test_mask_same_image_drops_captions_of_the_anchor_image() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.rand(6, 6, generator=g, dtype=torch.float64)
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])
    same = image_ids[:, None] == image_ids[None, :]
    loss_fn = AOQLoss("triplet", mask_same_image=True)
    img, cap = reference_online(s, 0.2, True, not_negative=same)
    assert float(loss_fn(s, image_ids=image_ids)) == pytest.approx(float(img.sum() + cap.sum()))
    assert float(AOQLoss("triplet")(s)) != pytest.approx(float(img.sum() + cap.sum()))


def test_offline_and_quintuplet_terms_by_hand() -> None:
    s, off = hand_scores(), hand_offline()
    pos = torch.tensor([0.9, 0.5, 0.8], dtype=torch.float64)
    loss_fn = AOQLoss("offquin", margin_offline=0.05)
    loss_fn(s, off)
    t = {k: float(v) for k, v in loss_fn.last_terms.items()}
    expect = {
        "offline_caption_negative": (0.05 + off.image_caption_off - pos).clamp(min=0).sum(),
        "offline_image_negative": (0.05 + off.image_off_caption - pos).clamp(min=0).sum(),
        "quintuplet_offline_pair": (0.05 + off.image_off_caption_off - pos).clamp(min=0).sum(),
        "quintuplet_positive_pair": (0.05 + off.positives_of_offline - pos).clamp(min=0).sum(),
    }
    for k, v in expect.items():
        assert t[k] == pytest.approx(float(v)), k
    # by hand: green k0 0.05+0.95-0.9=0.10, yellow k1 0.05+0.7-0.5=0.25,
    # light blue k0 0.07 + k2 0.10, dark blue k1 0.15 + k2 0.06
    assert t["offline_caption_negative"] == pytest.approx(0.10)
    assert t["offline_image_negative"] == pytest.approx(0.25)
    assert t["quintuplet_offline_pair"] == pytest.approx(0.17)
    assert t["quintuplet_positive_pair"] == pytest.approx(0.21)


def test_variant_terms_are_cumulative() -> None:
    s, off = hand_scores(), hand_offline()
    names = {}
    for variant in ("triplet", "offtri", "offquin", "aoq"):
        loss_fn = AOQLoss(variant)
        loss_fn(s, None if variant == "triplet" else off)
        names[variant] = {k for k in loss_fn.last_terms if k in TERM_NAMES}
    assert names["triplet"] == set(TERM_NAMES[:2])
    assert names["offtri"] == set(TERM_NAMES[:4])
    assert names["offquin"] == names["aoq"] == set(TERM_NAMES)


def test_adaptive_weights_by_hand_including_a_negative_weight() -> None:
    s, off = hand_scores(), hand_offline()
    loss_fn = AOQLoss("aoq", margin_online=0.2, margin_offline=0.0, alpha=0.3, beta=1.5)
    loss_fn(s, off)
    # Online hardest (unhinged): S(I,T_on) = [0.7, 0.6, 0.4]; S(I_on,T) = [0.6, 0.4, 0.7]
    w_i = 1.5 - (off.image_caption_off - torch.tensor([0.7, 0.6, 0.4], dtype=torch.float64)) / 0.3
    w_t = 1.5 - (off.image_off_caption - torch.tensor([0.6, 0.4, 0.7], dtype=torch.float64)) / 0.3
    assert float(w_i[0]) == pytest.approx(0.6666667)
    w_t_k1 = 1.5 - (0.7 - 0.4) / 0.3  # = 0.5
    assert float(w_t[1]) == pytest.approx(w_t_k1)
    img, cap = reference_online(s, 0.2, True)
    assert float(loss_fn.last_terms["online_image_anchor"]) == pytest.approx(float((w_i * img).sum()))
    assert float(loss_fn.last_terms["online_caption_anchor"]) == pytest.approx(float((w_t * cap).sum()))
    # A very hard offline negative drives the weight below zero; it is not clamped.
    hard = OfflineScores(torch.tensor([0.9, 0.9, 0.9], dtype=torch.float64), off.image_off_caption,
                         off.image_off_caption_off, off.positives_of_offline)
    loss_neg = AOQLoss("aoq", alpha=0.1, beta=0.5)
    loss_neg(s, hard)
    w = 0.5 - (0.9 - 0.6) / 0.1  # anchor 1: -2.5
    assert float(loss_neg.last_terms["online_image_anchor"]) == pytest.approx(w * 0.3)
    assert float(loss_neg.last_terms["online_image_anchor"]) < 0


def test_gradient_flows_through_adaptive_weights() -> None:
    s = hand_scores().clone()
    off = hand_offline()
    ic = off.image_caption_off.clone().requires_grad_(True)
    loss = AOQLoss("aoq")(s, OfflineScores(ic, off.image_off_caption, off.image_off_caption_off,
                                           off.positives_of_offline))
    loss.backward()
    # anchor 1 has an active online term (0.3); its weight depends on S(I, T_off).
    assert ic.grad is not None and float(ic.grad[1]) == pytest.approx(-0.3 / 0.3)


@pytest.mark.parametrize("variant", ["triplet", "offtri", "offquin", "aoq"])
@pytest.mark.parametrize("max_violation", [True, False])
def test_gradcheck_every_variant(variant: str, max_violation: bool) -> None:
    g = torch.Generator().manual_seed(3)
    # Well-separated values keep max/hinge away from their kinks for finite differences.
    base = torch.randperm(36, generator=g).double().reshape(6, 6) / 36
    s = base.clone().requires_grad_(True)
    vecs = [(torch.randperm(6, generator=g).double() / 6 + 0.013 * k).requires_grad_(True)
            for k in range(4)]
    loss_fn = AOQLoss(variant, max_violation=max_violation, margin_online=0.1, margin_offline=0.05)

    def f(scores, a, b, c, d):
        return loss_fn(scores, None if variant == "triplet" else OfflineScores(a, b, c, d))

    assert torch.autograd.gradcheck(f, (s, *vecs), eps=1e-6, atol=1e-5)


def test_errors() -> None:
    with pytest.raises(ValueError, match="needs OfflineScores"):
        AOQLoss("aoq")(hand_scores())
    with pytest.raises(ValueError, match="square"):
        AOQLoss("triplet")(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="variant"):
        AOQLoss("quad")
    with pytest.raises(ValueError, match="alpha"):
        AOQLoss(alpha=0)
