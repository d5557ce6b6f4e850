"""VSE-infinity on precomputed regions with the BiGRU text encoder (Chen et al., CVPR
2021): VSE++'s global embeddings with GPO instead of max/mean pooling on both sides.

Images: a linear map plus a 2-layer MLP residual (BatchNorm in its hidden layer) on
every region, then GPO over the regions. During training each region is dropped with
probability ``model.region_dropout`` (the authors' size augmentation, which teaches GPO
to handle any set size). Captions: BiGRU word features, then GPO over the words; in
training each word is, with probability ``model.word_dropout``, masked (half the time),
replaced by a random word (a tenth) or deleted (the rest), as the authors augment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aoq.config import ModelConfig
from aoq.models.base import RetrievalModel
from aoq.models.layers import region_projection
from aoq.models.gpo import GPO
from aoq.models.text import GRUWordEncoder
from aoq.models.vse import l2_normalize
from aoq.models.registry import register_model


class RegionMLP(nn.Module):
    """(B, N, D_in) -> (B, N, D_out): Linear, BatchNorm, ReLU, Linear, per region."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = F.relu(self.bn(self.hidden(x.reshape(b * n, d))))
        return self.out(h).view(b, n, -1)


def drop_regions(regions: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each region with probability ``p`` (at least one survives per image) and
    move the survivors to the front. Returns (B, R, D) regions and (B,) counts."""
    b, r, _ = regions.shape
    keep = torch.rand(b, r, device=regions.device) >= p
    keep[torch.arange(b), torch.randint(r, (b,), device=regions.device)] = True
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    moved = regions.gather(1, order[..., None].expand_as(regions))
    return moved, keep.sum(dim=1)


#: Token id the augmentation masks words with (the authors add a <mask> word; the SCAN
#: vocabulary layout has none, so <unk> plays its part).
MASK_ID = 3
FIRST_WORD_ID = 4  # ids below are <pad> <start> <end> <unk>


def augment_captions(tokens: torch.Tensor, lengths: torch.Tensor, p: float, vocab_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """VSE-infinity's caption augmentation on (B, L) ids framed by <start> ... <end>.

    Each word (not the frame) is hit with probability ``p``; a hit word is masked with
    probability 0.5, replaced by a random word with 0.1, deleted otherwise. Deleted
    words close up. Returns new (B, L) ids (0-padded) and (B,) lengths."""
    b, width = tokens.shape
    pos = torch.arange(width, device=tokens.device)[None]
    lengths = lengths.to(tokens.device)
    is_word = (pos >= 1) & (pos < lengths[:, None] - 1)
    hit = (torch.rand(b, width, device=tokens.device) < p) & is_word
    kind = torch.rand(b, width, device=tokens.device)
    out = tokens.masked_fill(hit & (kind < 0.5), MASK_ID)
    swap = hit & (kind >= 0.5) & (kind < 0.6)
    random_words = torch.randint(FIRST_WORD_ID, max(vocab_size, FIRST_WORD_ID + 1),
                                 (b, width), device=tokens.device)
    out = torch.where(swap, random_words, out)
    keep = (pos < lengths[:, None]) & ~(hit & (kind >= 0.6))
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    new_lengths = keep.sum(dim=1)
    out = out.gather(1, order).masked_fill(pos >= new_lengths[:, None], 0)
    return out, new_lengths


@register_model("vse_gpo")
class VSEGPO(RetrievalModel):
    """Global embeddings pooled by GPO; scores are cosine similarities."""

    has_global_embedding = True
    # BatchNorm over the batch in the region MLP; random region and word dropout.
    encodes_items_independently = False

    def __init__(self, cfg: ModelConfig, vocab_size: int, img_dim: int) -> None:
        super().__init__()
        self.fc = region_projection(img_dim, cfg.embed_dim)
        self.mlp = RegionMLP(img_dim, cfg.embed_dim // 2, cfg.embed_dim)
        self.image_pool = GPO(cfg.gpo_pe_dim, cfg.gpo_hidden)
        self.text = GRUWordEncoder(vocab_size, cfg.word_dim, cfg.embed_dim, cfg.text_layers,
                                   bidirectional=True)
        self.text_pool = GPO(cfg.gpo_pe_dim, cfg.gpo_hidden)
        self.region_dropout = cfg.region_dropout
        self.word_dropout = cfg.word_dropout
        self.vocab_size = vocab_size

    def encode_images(self, regions: torch.Tensor) -> torch.Tensor:
        regions = regions.float()
        if self.training and self.region_dropout > 0:
            regions, counts = drop_regions(regions, self.region_dropout)
        else:
            counts = torch.full((regions.shape[0],), regions.shape[1], device=regions.device)
        features = self.fc(regions) + self.mlp(regions)
        return l2_normalize(self.image_pool(features, counts))

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.training and self.word_dropout > 0:
            tokens, lengths = augment_captions(tokens, lengths, self.word_dropout,
                                               self.vocab_size)
        words = self.text(tokens, lengths)
        return l2_normalize(self.text_pool(words, lengths.clamp_min(1)))


__all__ = ["VSEGPO", "augment_captions", "drop_regions"]
