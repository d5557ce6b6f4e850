"""Cross-attention scoring shared by SCAN and BFAN, without the (pairs, words, D) tensor.

SCAN (Lee et al. 2018) and BFAN (Liu et al. 2019) score a pair (image, caption) by
letting every word attend over the regions (t2i) and/or every region over the words
(i2t), then comparing each query with its attended context by cosine similarity. The
authors loop over captions and build a (n_images, n_words, D) context per caption. Here
everything is expressed through the raw scores s[w, r] = word_w . region_r and the Gram
matrices of regions and words:

    query . context_q = sum_j a[q, j] s[q, j]
    |context_q|^2     = a[q] G a[q]^T          (G: Gram matrix of the context side)

which is the same number, costs O(pairs * L * R) memory instead of O(pairs * L * D), and
lets one GEMM compute the raw scores of a whole (images x captions) block.

Encodings: an image is (R, D) region vectors; a caption is (L, D + 1) word vectors whose
last channel is 1 for real words and 0 for padding, so captions stay plain tensors that
the training step can slice and the evaluator can concatenate (after padding).

Layouts: scores are computed on a grid (A, C, ...) where image-side tensors vary along A
and caption-side tensors along C. ``all pairs``: A = n_images, C = n_captions.
``paired`` (row-aligned pairs): A = n_pairs, C = 1 and both sides vary along A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Elements of one (A, C, L, R) intermediate per chunk of captions (~64 MB in float32).
CHUNK_ELEMENTS = 1 << 24


def pack_words(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(N, L, D) word features and (N,) lengths -> (N, L, D + 1) with a mask channel.

    Padded positions are zeroed so they can never leak into a score."""
    steps = torch.arange(features.shape[1], device=features.device)
    mask = (steps[None, :] < lengths.to(features.device)[:, None]).to(features.dtype)
    return torch.cat([features * mask[..., None], mask[..., None]], dim=-1)


def unpack_words(encoding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D + 1) -> (N, L, D) word features and (N, L) float mask (1 = real word)."""
    return encoding[..., :-1], encoding[..., -1]


def pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (N_k, L_k, ...) tensors along dim 0, zero-padding dim 1 to the max."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])


def l2norm(x: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """The SCAN/BFAN normalisation: x / (||x|| + eps) (eps added, not clamped).

    ``Tensor.norm`` rather than sqrt(sum(x^2)): its gradient at an all-zero vector (the
    scores of a padding word) is 0, where sqrt's would be inf * 0 = NaN."""
    return x / (x.norm(dim=dim, keepdim=True) + eps)


@dataclass
class PairGrid:
    """Image and caption encodings laid out for scoring (see the module docstring).

    Attributes:
        s: (A, C, L, R) raw scores word . region.
        word_mask: (A|1, C|1, L) 1 for real words.
        word_norm: (A|1, C|1, L) word vector norms; region_norm: (A, 1, R).
        gram_regions: (A, R, R); gram_words: (C, L, L) for all pairs, (A, L, L) paired.
        paired: which of the two layouts.
    """

    s: torch.Tensor
    word_mask: torch.Tensor
    word_norm: torch.Tensor
    region_norm: torch.Tensor
    gram_regions: torch.Tensor
    gram_words: torch.Tensor
    paired: bool

    @classmethod
    def build(cls, regions: torch.Tensor, captions: torch.Tensor, paired: bool) -> "PairGrid":
        """(A, R, D) regions and (C, L, D + 1) captions (C = A when ``paired``)."""
        words, mask = unpack_words(captions)
        if paired:
            s = torch.bmm(words, regions.transpose(1, 2))[:, None]  # (A, 1, L, R)
            word_mask, word_norm = mask[:, None], words.norm(dim=-1)[:, None]
        else:
            a, r, d = regions.shape
            c, l, _ = words.shape
            # One GEMM for the whole block: (A*R, D) x (D, C*L).
            s = (regions.reshape(a * r, d) @ words.reshape(c * l, d).t())
            s = s.view(a, r, c, l).permute(0, 2, 3, 1)
            word_mask, word_norm = mask[None], words.norm(dim=-1)[None]
        return cls(s=s, word_mask=word_mask, word_norm=word_norm,
                   region_norm=regions.norm(dim=-1)[:, None],
                   gram_regions=regions @ regions.transpose(1, 2),
                   gram_words=words @ words.transpose(1, 2), paired=paired)

    def region_side(self, a: torch.Tensor) -> torch.Tensor:
        """(A, C, Q, R) weights over regions -> (A, C, Q, R) = a @ gram_regions."""
        n_a, n_c, q, r = a.shape
        return torch.bmm(a.reshape(n_a, n_c * q, r), self.gram_regions).view(n_a, n_c, q, r)

    def word_side(self, a: torch.Tensor) -> torch.Tensor:
        """(A, C, Q, L) weights over words -> (A, C, Q, L) = a @ gram_words."""
        n_a, n_c, q, l = a.shape
        if self.paired:
            return torch.bmm(a.reshape(n_a, n_c * q, l), self.gram_words).view(n_a, n_c, q, l)
        moved = a.permute(1, 0, 2, 3).reshape(n_c, n_a * q, l)
        return torch.bmm(moved, self.gram_words).view(n_c, n_a, q, l).permute(1, 0, 2, 3)


def attend_t2i(grid: PairGrid, smooth: float) -> torch.Tensor:
    """Words attend over regions: (A, C, L, R) attention weights (rows sum to 1).

    SCAN's ``clipped_l2norm``: leaky-ReLU the raw scores, L2-normalise each region's
    scores across the words (padding excluded), then a softmax over regions at
    temperature 1 / ``smooth``."""
    attn = F.leaky_relu(grid.s, 0.1) * grid.word_mask[..., None]
    attn = l2norm(attn, dim=2)
    return torch.softmax(attn * smooth, dim=-1)


def attend_i2t(grid: PairGrid, smooth: float) -> torch.Tensor:
    """Regions attend over words: (A, C, R, L) attention weights (padding gets 0)."""
    attn = l2norm(F.leaky_relu(grid.s, 0.1), dim=3).transpose(2, 3)
    attn = (attn * smooth).masked_fill(grid.word_mask[:, :, None, :] == 0, float("-inf"))
    return torch.softmax(attn, dim=-1)


def _sqrt(squared_norm: torch.Tensor) -> torch.Tensor:
    """sqrt of a squared norm from a quadratic form: rounding can make it slightly
    negative, and sqrt's gradient at 0 is infinite, so floor it far below any real norm."""
    return squared_norm.clamp_min(1e-20).sqrt()


def query_cosines_t2i(grid: PairGrid, attn: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(A, C, L) cosine between each word and its attended region context."""
    dot = (attn * grid.s).sum(-1)
    context_norm = _sqrt((grid.region_side(attn) * attn).sum(-1))
    return dot / (grid.word_norm * context_norm).clamp_min(eps)


def query_cosines_i2t(grid: PairGrid, attn: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(A, C, R) cosine between each region and its attended word context."""
    dot = (attn * grid.s.transpose(2, 3)).sum(-1)
    context_norm = _sqrt((grid.word_side(attn) * attn).sum(-1))
    return dot / (grid.region_norm * context_norm).clamp_min(eps)


def aggregate(cos: torch.Tensor, mask: torch.Tensor | None, how: str, lambda_lse: float
              ) -> torch.Tensor:
    """(A, C, Q) per-query cosines -> (A, C) pair scores, over real queries only.

    ``mean``: average; ``lse``: log(sum exp(lambda * cos)) / lambda (SCAN's LogSumExp)."""
    if how == "mean":
        if mask is None:
            return cos.mean(-1)
        return (cos * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    if how == "lse":
        logits = cos * lambda_lse
        if mask is not None:
            logits = logits.masked_fill(mask == 0, float("-inf"))
        return torch.logsumexp(logits, dim=-1) / lambda_lse
    raise ValueError(f"unknown aggregation {how!r} (mean or lse)")


def focal_reattend(attn: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """BFAN's focal step on (..., S) attention rows: keep the sources whose weight beats
    the others on balance, drop the rest, renormalise.

    ``equal``: F_i = sum_j (a_i - a_j); ``prob``: F_i = sum_j (a_i - a_j) sqrt(a_j). A
    source is kept when F_i > 0. ``mask`` (broadcastable to ``attn``, 1 = real source)
    restricts the sums to real words. A row where nothing is kept (all weights equal)
    keeps its original attention instead of dividing 0 by 0.
    """
    real = torch.ones_like(attn) if mask is None else mask.expand_as(attn)
    if kind == "equal":
        score = attn * real.sum(-1, keepdim=True) - (attn * real).sum(-1, keepdim=True)
    elif kind == "prob":
        root = attn.clamp_min(0).sqrt() * real
        score = attn * root.sum(-1, keepdim=True) - (attn * root).sum(-1, keepdim=True)
    else:
        raise ValueError(f"unknown focal type {kind!r} (equal or prob)")
    keep = ((score > 0) & (real > 0)).to(attn.dtype)
    kept = attn * keep
    total = kept.sum(-1, keepdim=True)
    return torch.where(total > 0, kept / total.clamp_min(1e-30), attn)


def chunked_scores(score_block, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """All-pairs (N_i, N_c) scores, ``score_block(images, caption_chunk)`` per chunk of
    captions sized so that one (N_i, chunk, L, R) intermediate stays near
    ``CHUNK_ELEMENTS`` elements."""
    per_caption = max(1, images.shape[0] * images.shape[1] * captions.shape[1])
    chunk = max(1, CHUNK_ELEMENTS // per_caption)
    return torch.cat([score_block(images, captions[start:start + chunk])
                      for start in range(0, captions.shape[0], chunk)], dim=1)


__all__ = [
    "PairGrid", "aggregate", "attend_i2t", "attend_t2i", "chunked_scores", "focal_reattend",
    "l2norm", "pack_words", "pad_cat", "query_cosines_i2t", "query_cosines_t2i",
    "unpack_words",
]
