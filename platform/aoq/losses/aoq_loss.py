"""The AOQ loss family as pure functions of similarity scores (docs/architecture.md,
"The method").

The loss never sees embeddings: the model scores the in-batch B x B matrix and the four
offline pairs per anchor, so the same loss serves cosine models (VSE++, VSRN, GPO) and
cross-attention models (SCAN, BFAN).

Variants, each adding to the previous one:

* ``triplet``  - VSE++: hinge against the hardest in-batch negative, both directions.
* ``offtri``   - plus two offline triplets: [m_off + S(I, T_off) - S(I, T)]+ and
  [m_off + S(I_off, T) - S(I, T)]+.
* ``offquin``  - plus two quintuplet terms with no shared anchor:
  [m_off + S(I_off, T_off) - S(I, T)]+ and [m_off + S(P_img, P_cap) - S(I, T)]+.
* ``aoq``      - plus adaptive weights on the online terms,
  w_I = beta - (S(I, T_off) - S(I, T_on)) / alpha and likewise w_T. As in the authors'
  code they are neither clamped nor detached: the gradient flows through them and a
  weight may be negative.

Per-term weights ``offline_triplet_weight`` and ``quintuplet_weight`` scale the two
offline triplet terms and the two quintuplet terms in the summed loss (default 1: the
paper's loss). :attr:`AOQLoss.last_terms` holds the unweighted terms, so runs with
different weights log comparable hinge values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

VARIANTS = ("triplet", "offtri", "offquin", "aoq")

#: Term names in the order of the paper's Fig. 2 legend.
TERM_NAMES = (
    "online_image_anchor",        # orange: w_I [m_on + S(I, T_on) - S(I, T)]+
    "online_caption_anchor",      # red:    w_T [m_on + S(I_on, T) - S(I, T)]+
    "offline_caption_negative",   # green:  [m_off + S(I, T_off) - S(I, T)]+
    "offline_image_negative",     # yellow: [m_off + S(I_off, T) - S(I, T)]+
    "quintuplet_offline_pair",    # light blue: [m_off + S(I_off, T_off) - S(I, T)]+
    "quintuplet_positive_pair",   # dark blue:  [m_off + S(P_img, P_cap) - S(I, T)]+
)


@dataclass(frozen=True)
class OfflineScores:
    """Scores of the offline pairs, one per anchor; every field has shape (B,).

    Attributes:
        image_caption_off: S(I, T_off), the anchor image with its offline caption negative.
        image_off_caption: S(I_off, T), the offline image negative with the anchor caption.
        image_off_caption_off: S(I_off, T_off), the two offline negatives together.
        positives_of_offline: S(P_img, P_cap), the image of T_off with a caption of I_off.
    """

    image_caption_off: torch.Tensor
    image_off_caption: torch.Tensor
    image_off_caption_off: torch.Tensor
    positives_of_offline: torch.Tensor


def _hinge(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0)


class AOQLoss(nn.Module):
    """Adaptive offline quintuplet loss and its ablation variants.

    Call as ``loss_fn(scores, offline)``: ``scores`` is the (B, B) in-batch matrix with
    image rows, caption columns and positives on the diagonal; ``offline`` is an
    :class:`OfflineScores` (``None`` is allowed only for ``triplet``). Returns the summed
    loss (a 0-d tensor). The per-term sums of the last call are in :attr:`last_terms`.
    """

    def __init__(
        self,
        variant: str = "aoq",
        margin_online: float = 0.2,
        margin_offline: float = 0.0,
        alpha: float = 0.3,
        beta: float = 1.5,
        max_violation: bool = True,
        mask_same_image: bool = False,
        offline_triplet_weight: float = 1.0,
        quintuplet_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: must be one of {VARIANTS}")
        if not alpha > 0:
            raise ValueError(f"alpha={alpha}: must be > 0")
        if offline_triplet_weight < 0 or quintuplet_weight < 0:
            raise ValueError(f"term weights must be >= 0, got offline_triplet_weight="
                             f"{offline_triplet_weight}, quintuplet_weight={quintuplet_weight}")
        self.variant = variant
        self.margin_online = margin_online
        self.margin_offline = margin_offline
        self.alpha = alpha
        self.beta = beta
        self.max_violation = max_violation
        self.mask_same_image = mask_same_image
        #: Weight of each term in the summed loss (the online terms carry w_I / w_T
        #: inside them under ``aoq``).
        self.term_weights = {
            "online_image_anchor": 1.0, "online_caption_anchor": 1.0,
            "offline_caption_negative": offline_triplet_weight,
            "offline_image_negative": offline_triplet_weight,
            "quintuplet_offline_pair": quintuplet_weight,
            "quintuplet_positive_pair": quintuplet_weight,
        }
        # Detached, so reading them never syncs a GPU until the caller asks for a number.
        self.last_terms: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg) -> "AOQLoss":
        """Build from the ``loss`` section of the config (an ``aoq.config.LossConfig``)."""
        return cls(
            variant=cfg.variant, margin_online=cfg.margin_online,
            margin_offline=cfg.margin_offline, alpha=cfg.alpha, beta=cfg.beta,
            max_violation=cfg.max_violation, mask_same_image=cfg.mask_same_image,
            offline_triplet_weight=cfg.offline_triplet_weight,
            quintuplet_weight=cfg.quintuplet_weight,
        )

    @property
    def needs_offline(self) -> bool:
        """Whether this variant consumes offline negatives."""
        return self.variant != "triplet"

    def terms(
        self,
        scores: torch.Tensor,
        offline: OfflineScores | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each active term summed over the batch (0-d tensors, differentiable).

        Args:
            scores: (B, B) in-batch scores, positives on the diagonal.
            offline: the four (B,) offline score vectors; required unless ``triplet``.
            image_ids: (B,) image index of each anchor pair; required when
                ``mask_same_image`` is on, to drop captions of the anchor's own image.
        """
        if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
            raise ValueError(f"scores must be a square (B, B) matrix, got {tuple(scores.shape)}")
        if self.needs_offline and offline is None:
            raise ValueError(f"variant {self.variant!r} needs OfflineScores; got None")
        batch = scores.shape[0]
        positive = scores.diagonal()  # S(I, T), (B,)

        # Negatives are everything off the diagonal, or, with mask_same_image, everything
        # that does not share the anchor's image (5 captions per image make such pairs
        # likely in a batch; the authors count them as negatives).
        not_negative = torch.eye(batch, dtype=torch.bool, device=scores.device)
        if self.mask_same_image:
            if image_ids is None:
                raise ValueError("mask_same_image=True needs image_ids")
            not_negative = not_negative | (image_ids[:, None] == image_ids[None, :])

        # cost_caption[k, j]: image k as anchor, caption j as negative; cost_image[j, k]:
        # caption k as anchor, image j as negative.
        cost_caption = _hinge(self.margin_online + scores - positive[:, None])
        cost_image = _hinge(self.margin_online + scores - positive[None, :])
        cost_caption = cost_caption.masked_fill(not_negative, 0.0)
        cost_image = cost_image.masked_fill(not_negative, 0.0)
        hardest_i, hardest_t = cost_caption.max(dim=1).values, cost_image.max(dim=0).values
        if self.max_violation:
            online_i, online_t = hardest_i, hardest_t
        else:
            online_i = cost_caption.sum(dim=1)
            online_t = cost_image.sum(dim=0)

        out: dict[str, torch.Tensor] = {}
        if self.variant == "aoq":
            assert offline is not None
            # Hardest in-batch negative scores S(I, T_on) and S(I_on, T), not hinged.
            masked = scores.masked_fill(not_negative, float("-inf"))
            hardest_caption = masked.max(dim=1).values
            hardest_image = masked.max(dim=0).values
            # A batch with no negatives at all (B = 1) leaves -inf; use the positive so
            # the weight stays finite (the online term is 0 there anyway).
            hardest_caption = torch.where(torch.isfinite(hardest_caption), hardest_caption,
                                          positive)
            hardest_image = torch.where(torch.isfinite(hardest_image), hardest_image, positive)
            w_i = self.beta - (offline.image_caption_off - hardest_caption) / self.alpha
            w_t = self.beta - (offline.image_off_caption - hardest_image) / self.alpha
            online_i = online_i * w_i
            online_t = online_t * w_t
            hardest_i, hardest_t = hardest_i * w_i, hardest_t * w_t
        out["online_image_anchor"] = online_i.sum()
        out["online_caption_anchor"] = online_t.sum()
        if not self.max_violation:
            # For logging only: the hardest-negative terms of the same batch, the quantity
            # a max-violation epoch optimises, so a warm-up epoch's loss can be charted on
            # the scale of the epochs after it.
            out["hardest_online_image_anchor"] = hardest_i.detach().sum()
            out["hardest_online_caption_anchor"] = hardest_t.detach().sum()
        if self.variant in ("offtri", "offquin", "aoq"):
            assert offline is not None
            m = self.margin_offline
            out["offline_caption_negative"] = _hinge(m + offline.image_caption_off - positive).sum()
            out["offline_image_negative"] = _hinge(m + offline.image_off_caption - positive).sum()
        if self.variant in ("offquin", "aoq"):
            assert offline is not None
            m = self.margin_offline
            out["quintuplet_offline_pair"] = _hinge(
                m + offline.image_off_caption_off - positive).sum()
            out["quintuplet_positive_pair"] = _hinge(
                m + offline.positives_of_offline - positive).sum()
        if self.variant == "aoq":
            out["weight_image_anchor_mean"] = w_i.detach().mean()
            out["weight_caption_anchor_mean"] = w_t.detach().mean()
        return out

    def forward(
        self,
        scores: torch.Tensor,
        offline: OfflineScores | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        terms = self.terms(scores, offline, image_ids)
        loss = sum(self.term_weights[k] * v for k, v in terms.items() if k in TERM_NAMES)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return loss  # type: ignore[return-value]
