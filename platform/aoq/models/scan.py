"""SCAN: stacked cross attention (Lee et al., ECCV 2018).

t2i: every word attends over the regions; i2t: every region attends over the words.
Each query is compared with its attended context by cosine similarity and the
per-query similarities are pooled by their mean or by LogSumExp. The attention follows
the authors' default ``clipped_l2norm`` (leaky-ReLU, L2 over the query axis, softmax at
temperature 1/lambda_softmax).
"""

from __future__ import annotations

from aoq.config import ModelConfig
from aoq.models.cross_attention import (
    PairGrid, aggregate, attend_i2t, attend_t2i, query_cosines_i2t, query_cosines_t2i,
)
from aoq.models.region_word import RegionWordModel
from aoq.models.registry import register_model

#: The authors' released lambda_softmax per direction (COCO and F30K commands).
DEFAULT_LAMBDA_SOFTMAX = {"t2i": 9.0, "i2t": 4.0}


@register_model("scan")
class SCAN(RegionWordModel):
    """``model.scan_direction`` picks t2i or i2t; ``model.aggregation`` mean or lse."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, img_dim: int) -> None:
        super().__init__(cfg, vocab_size, img_dim)
        self.direction = cfg.scan_direction
        self.aggregation = cfg.aggregation
        self.lambda_softmax = cfg.lambda_softmax or DEFAULT_LAMBDA_SOFTMAX[self.direction]
        self.lambda_lse = cfg.lambda_lse

    def score_grid(self, grid: PairGrid):
        if self.direction == "t2i":
            cos = query_cosines_t2i(grid, attend_t2i(grid, self.lambda_softmax))
            return aggregate(cos, grid.word_mask, self.aggregation, self.lambda_lse)
        cos = query_cosines_i2t(grid, attend_i2t(grid, self.lambda_softmax))
        return aggregate(cos, None, self.aggregation, self.lambda_lse)


__all__ = ["SCAN"]
