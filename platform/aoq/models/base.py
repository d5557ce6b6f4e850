"""The interface every retrieval model implements.

A model turns region features and token ids into *encodings* and scores encodings.
For global-embedding models (VSE++, VSRN, GPO) an encoding is one L2-normalised vector
and the score is a dot product; cross-attention models (SCAN, BFAN) keep per-region and
per-word encodings and score pairs by attending between them. Training code only ever
calls :meth:`forward`, :meth:`similarity` and :meth:`paired_similarity`, so it is the
same for both kinds.
"""

from __future__ import annotations

import torch
from torch import nn


class RetrievalModel(nn.Module):
    """Base class: encode both modalities in one ``forward`` (so DDP syncs every
    parameter used), then score with parameter-free similarity functions."""

    #: True when an encoding is one vector per item, so top-K mining can use dot products.
    has_global_embedding: bool = True

    #: True when, in training, an item's encoding depends on that item alone (no batch
    #: statistics, no random augmentation): a step may then encode each distinct image
    #: and caption once for every place it fills, with the same loss.
    encodes_items_independently: bool = True

    def encode_images(self, regions: torch.Tensor) -> torch.Tensor:
        """(B, R, D_img) region features -> image encodings (B, ...)."""
        raise NotImplementedError

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 token ids, (B,) lengths -> caption encodings (B, ...)."""
        raise NotImplementedError

    def forward(
        self, regions: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
        pairs: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of images and a batch of captions (sizes may differ).

        ``pairs``: the first ``pairs`` images and captions are matching pairs (the
        anchors of a training batch); a model with an auxiliary loss computes it on them.
        """
        return self.encode_images(regions), self.encode_captions(tokens, lengths)

    def concat_encodings(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Join encodings of consecutive batches along dim 0 (word-level encodings of
        different batches have different lengths; such models pad here)."""
        return torch.cat(parts)

    def similarity(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """All pairs: (N_i, ...) x (N_c, ...) encodings -> (N_i, N_c) scores."""
        return images @ captions.t()

    def paired_similarity(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Row-aligned pairs: (N, ...) x (N, ...) encodings -> (N,) scores."""
        return (images * captions).sum(dim=-1)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """An extra training loss computed during the last forward (e.g. VSRN's
        caption generation), or None."""
        return None
