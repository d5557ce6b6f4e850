"""VSRN: visual semantic reasoning (Li et al., ICCV 2019).

Images: regions are projected into the joint space, related to each other by four
residual graph-convolution layers (region-relation reasoning), and read in order by a
GRU whose last state is the image embedding (global semantic reasoning). A caption
generator on the reasoned regions adds an auxiliary loss, so the regions keep what a
sentence about the image needs. Captions: a unidirectional GRU; its last state is the
caption embedding. Scores are cosine similarities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aoq.config import ModelConfig
from aoq.models.base import RetrievalModel
from aoq.models.layers import region_projection
from aoq.models.vse import GRUTextEncoder, l2_normalize
from aoq.models.registry import register_model


def normalize_over_regions(x: torch.Tensor) -> torch.Tensor:
    """(B, R, D) -> x / ||x|| along the *region* axis.

    The authors' ``l2norm`` always normalises dim 1, which for (B, R, D) region tensors
    is the region axis, not the feature axis. Their published numbers come from that
    behaviour, so it is kept."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


class RelationGCN(nn.Module):
    """One region-relation reasoning layer: (B, D, R) -> (B, D, R).

    Affinities R = theta(v)^T phi(v) / N between all region pairs, messages R g(v), a
    1x1 projection with BatchNorm, plus the input. The BatchNorm starts at zero, so each
    layer starts as the identity."""

    def __init__(self, channels: int, inter: int) -> None:
        super().__init__()
        self.g = nn.Conv1d(channels, inter, 1)
        self.theta = nn.Conv1d(channels, inter, 1)
        self.phi = nn.Conv1d(channels, inter, 1)
        self.w = nn.Conv1d(inter, channels, 1)
        self.bn = nn.BatchNorm1d(channels)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    @staticmethod
    def _pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        """A 1x1 convolution applied to (B, R, C) as the matrix product it is (several
        times faster on CPU than the convolution kernel; same parameters)."""
        return F.linear(x, conv.weight[..., 0], conv.bias)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        x = v.transpose(1, 2)                               # (B, R, D)
        g = self._pointwise(self.g, x)                      # (B, R, I)
        affinity = self._pointwise(self.theta, x) @ self._pointwise(self.phi, x).transpose(1, 2)
        y = (affinity / affinity.shape[-1]) @ g             # (B, R, I)
        return self.bn(self._pointwise(self.w, y).transpose(1, 2)) + v


class CaptionGenerator(nn.Module):
    """VSRN's auxiliary captioner (an attention GRU encoder-decoder, teacher-forced).

    (B, R, E) reasoned regions and (B, L) target tokens -> masked negative
    log-likelihood summed over words, averaged over captions. As the authors' code, the
    loss also counts the one padding position after ``<end>`` (predicting ``<pad>``
    there), and the output layer starts xavier-normal."""

    def __init__(self, vocab_size: int, region_dim: int, hidden: int, word_dim: int,
                 max_len: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.project = nn.Linear(region_dim, hidden)
        nn.init.xavier_normal_(self.project.weight)
        self.encoder = nn.GRU(hidden, hidden, batch_first=True)
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.attn_hidden = nn.Linear(hidden * 2, hidden)
        self.attn_score = nn.Linear(hidden, 1, bias=False)
        self.decoder = nn.GRU(hidden + word_dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)
        nn.init.xavier_normal_(self.out.weight)
        self.dropout = nn.Dropout(dropout)
        self.max_len = max_len

    def _attend(self, state: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor
                ) -> torch.Tensor:
        """(B, H) decoder state over (B, R, H) encoder outputs -> (B, H) context.

        The attention MLP sees [memory_r, state] each step; its first layer is linear,
        so W [m; s] = W_m m + W_s s and the memory half (``keys``) is computed once per
        caption instead of once per word, the same function at a fraction of the cost."""
        hidden = self.attn_hidden.weight.shape[0]
        query = F.linear(state, self.attn_hidden.weight[:, hidden:])
        logits = self.attn_score(torch.tanh(keys + query[:, None]))
        return (torch.softmax(logits, dim=1) * memory).sum(dim=1)

    def forward(self, regions: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
                ) -> torch.Tensor:
        memory, state = self.encoder(self.dropout(self.project(regions)))
        hidden = self.attn_hidden.weight.shape[0]
        keys = F.linear(memory, self.attn_hidden.weight[:, :hidden], self.attn_hidden.bias)
        # One more target than words: the <pad> after <end> (a column of padding is
        # added so that the longest caption has one too).
        tokens = F.pad(tokens, (0, 1))
        steps = min(int(lengths.max()) + 1, self.max_len) - 1
        words = self.embed(tokens[:, :steps])
        log_probs = []
        for t in range(steps):
            context = self._attend(state[0], memory, keys)
            step_in = self.dropout(torch.cat([words[:, t], context], dim=-1))[:, None]
            out, state = self.decoder(step_in, state)
            log_probs.append(F.log_softmax(self.out(out[:, 0]), dim=-1))
        targets = tokens[:, 1:steps + 1]
        mask = (torch.arange(1, steps + 1, device=tokens.device)[None] <=
                lengths.to(tokens.device)[:, None]).float()
        nll = -torch.stack(log_probs, 1).gather(2, targets[..., None])[..., 0]
        return (nll * mask).sum() / tokens.shape[0]


@register_model("vsrn")
class VSRN(RetrievalModel):
    """Region-relation GCN + GRU image encoder, GRU caption encoder, auxiliary captioner."""

    has_global_embedding = True
    encodes_items_independently = False  # BatchNorm over the batch in the GCN

    def __init__(self, cfg: ModelConfig, vocab_size: int, img_dim: int) -> None:
        super().__init__()
        e = cfg.embed_dim
        self.fc = region_projection(img_dim, e)
        self.gcn = nn.Sequential(*(RelationGCN(e, e) for _ in range(cfg.gcn_layers)))
        self.region_gru = nn.GRU(e, e, batch_first=True)
        self.text_encoder = GRUTextEncoder(vocab_size, cfg.word_dim, e, cfg.text_layers,
                                           bidirectional=False)
        self.caption_weight = cfg.caption_loss_weight
        self.captioner = (CaptionGenerator(vocab_size, e, cfg.caption_hidden,
                                           cfg.caption_word_dim, cfg.caption_max_len)
                          if cfg.caption_loss_weight > 0 else None)
        self._aux: torch.Tensor | None = None

    def reason(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R, D_img) -> (B, E) image embeddings and (B, R, E) reasoned regions."""
        x = normalize_over_regions(self.fc(regions.float()))
        x = normalize_over_regions(self.gcn(x.transpose(1, 2)).transpose(1, 2))
        _, last = self.region_gru(x)
        return l2_normalize(last[0]), x

    def encode_images(self, regions: torch.Tensor) -> torch.Tensor:
        return self.reason(regions)[0]

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(tokens, lengths)

    def forward(self, regions: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        images, reasoned = self.reason(regions)
        captions = self.encode_captions(tokens, lengths)
        self._aux = None
        if self.training and self.captioner is not None:
            n = images.shape[0] if pairs is None else pairs
            # As the authors: the captioner learns from the anchors' pairs only.
            self._aux = self.caption_weight * self.captioner(reasoned[:n], tokens[:n],
                                                             lengths[:n])
        return images, captions

    def auxiliary_loss(self) -> torch.Tensor | None:
        return self._aux


__all__ = ["CaptionGenerator", "RelationGCN", "VSRN"]
