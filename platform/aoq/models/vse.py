"""VSE++ on precomputed region features (Faghri et al. 2018), with VSE-infinity's
region MLP as an option.

Images: each region is projected into the joint space (plus an MLP residual), then the
regions are pooled into one vector. Captions: a GRU over word embeddings; the hidden
state at the last real token is the caption vector. Both are L2-normalised, so the
score is cosine similarity.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from aoq.config import ModelConfig
from aoq.models.base import RetrievalModel
from aoq.models.gru import gru_last_states
from aoq.models.registry import register_model


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Unit-norm along ``dim``; ``eps`` keeps an all-zero vector finite."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


class RegionImageEncoder(nn.Module):
    """(B, R, D_img) regions -> (B, E) unit vectors."""

    def __init__(self, img_dim: int, embed_dim: int, pooling: str, use_mlp: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_dim)
        # VSE-infinity adds a small MLP on the raw regions to the linear projection:
        # the linear map alone cannot bind an attribute to its object within a region.
        self.mlp = (
            nn.Sequential(
                nn.Linear(img_dim, embed_dim // 2), nn.ReLU(inplace=True),
                nn.Linear(embed_dim // 2, embed_dim),
            )
            if use_mlp
            else None
        )
        self.pooling = pooling
        # Xavier-uniform as in VSE++: keeps the initial cosine scores spread out.
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_dim)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        x = self.fc(regions)
        if self.mlp is not None:
            x = x + self.mlp(regions)
        pooled = x.max(dim=1).values if self.pooling == "max" else x.mean(dim=1)
        return l2_normalize(pooled)


class GRUTextEncoder(nn.Module):
    """(B, L) token ids with (B,) lengths -> (B, E) unit vectors."""

    def __init__(
        self, vocab_size: int, word_dim: int, embed_dim: int, layers: int, bidirectional: bool
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.rnn = nn.GRU(
            word_dim, embed_dim, num_layers=layers, batch_first=True, bidirectional=bidirectional
        )
        self.bidirectional = bidirectional
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not self.bidirectional and tokens.device.type == "cpu":
            # cuDNN runs packed sequences natively; the CPU kernels do not
            # (aoq.models.gru says how they fall short).
            return l2_normalize(gru_last_states(self.rnn, self.embed, tokens,
                                                lengths.to(tokens.device).clamp_min(1)))
        # The backward direction must start at each caption's own end: packed.
        packed = pack_padded_sequence(
            self.embed(tokens), lengths.detach().cpu().clamp_min(1), batch_first=True,
            enforce_sorted=False,
        )
        _, hidden = self.rnn(packed)  # (layers * dirs, B, E), already at each true length
        return l2_normalize((hidden[-2] + hidden[-1]) / 2)


@register_model("vse")
class VSE(RetrievalModel):
    """VSE++: global image and caption embeddings compared by cosine similarity."""

    has_global_embedding = True

    def __init__(self, cfg: ModelConfig, vocab_size: int, img_dim: int) -> None:
        super().__init__()
        self.image_encoder = RegionImageEncoder(
            img_dim, cfg.embed_dim, cfg.image_pooling, cfg.image_mlp
        )
        self.text_encoder = GRUTextEncoder(
            vocab_size, cfg.word_dim, cfg.embed_dim, cfg.text_layers, cfg.bidirectional
        )

    def encode_images(self, regions: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(regions.float())

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(tokens, lengths)


__all__ = ["VSE", "l2_normalize"]
