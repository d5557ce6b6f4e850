"""The encoders and scoring plumbing SCAN and BFAN share: no global embedding, an image
is its projected regions and a caption its words (see :mod:`aoq.models.cross_attention`).
Subclasses only say how a grid of pairs is scored."""

from __future__ import annotations

import torch
from torch import nn

from aoq.config import ModelConfig
from aoq.models.base import RetrievalModel
from aoq.models.layers import region_projection
from aoq.models.cross_attention import PairGrid, chunked_scores, l2norm, pack_words, pad_cat
from aoq.models.text import GRUWordEncoder


class RegionWordModel(RetrievalModel):
    """Images: (B, R, D_img) -> (B, R, E) unit region vectors (one linear map, Xavier
    initialised, as both authors). Captions: (B, L) -> (B, L, E + 1) unit word vectors
    from a BiGRU plus the padding mask channel."""

    has_global_embedding = False

    def __init__(self, cfg: ModelConfig, vocab_size: int, img_dim: int) -> None:
        super().__init__()
        self.fc = region_projection(img_dim, cfg.embed_dim)
        # Both authors' released configurations use a bidirectional GRU.
        self.text = GRUWordEncoder(vocab_size, cfg.word_dim, cfg.embed_dim, cfg.text_layers,
                                   bidirectional=True)

    def encode_images(self, regions: torch.Tensor) -> torch.Tensor:
        return l2norm(self.fc(regions.float()), dim=-1)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return pack_words(l2norm(self.text(tokens, lengths), dim=-1), lengths)

    def concat_encodings(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return pad_cat(parts)

    def score_grid(self, grid: PairGrid) -> torch.Tensor:
        """(A, C) scores of a grid of pairs."""
        raise NotImplementedError

    def similarity(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        return chunked_scores(
            lambda imgs, caps: self.score_grid(PairGrid.build(imgs, caps, paired=False)),
            images, captions)

    def paired_similarity(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        return self.score_grid(PairGrid.build(images, captions, paired=True))[:, 0]


__all__ = ["RegionWordModel"]
