"""BFAN: bidirectional focal attention (Liu et al., ACM MM 2019).

Like SCAN's attention in both directions, then a focal step drops the fragments whose
attention weight loses on balance against the others (``equal``: plain differences;
``prob``: differences weighted by the square root of the other fragment's weight) and
renormalises over the kept ones. The pair score is the mean word-context cosine (t2i)
plus the mean region-context cosine (i2t).
"""

from __future__ import annotations

import torch

from aoq.config import ModelConfig
from aoq.models.cross_attention import (
    PairGrid, aggregate, attend_i2t, attend_t2i, focal_reattend, query_cosines_i2t,
    query_cosines_t2i,
)
from aoq.models.region_word import RegionWordModel
from aoq.models.registry import register_model

#: The authors' default lambda_softmax.
DEFAULT_LAMBDA_SOFTMAX = 20.0


@register_model("bfan")
class BFAN(RegionWordModel):
    """``model.focal_type`` picks equal or prob."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, img_dim: int) -> None:
        super().__init__(cfg, vocab_size, img_dim)
        self.focal_type = cfg.focal_type
        self.lambda_softmax = cfg.lambda_softmax or DEFAULT_LAMBDA_SOFTMAX

    def score_grid(self, grid: PairGrid) -> torch.Tensor:
        t2i = focal_reattend(attend_t2i(grid, self.lambda_softmax), None, self.focal_type)
        t2i_score = aggregate(query_cosines_t2i(grid, t2i), grid.word_mask, "mean", 0.0)
        words = grid.word_mask[:, :, None, :]  # sources of the i2t rows are words
        i2t = focal_reattend(attend_i2t(grid, self.lambda_softmax), words, self.focal_type)
        i2t_score = aggregate(query_cosines_i2t(grid, i2t), None, "mean", 0.0)
        return t2i_score + i2t_score


__all__ = ["BFAN"]
