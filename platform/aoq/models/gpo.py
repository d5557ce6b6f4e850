"""VSE-infinity's Generalized Pooling Operator (Chen et al., CVPR 2021).

GPO learns, for a set of N feature vectors, one weight per *rank*: each feature
dimension is sorted in descending order across the set and the k-th largest value gets
weight theta_k. The weights come from a small BiGRU over sinusoidal encodings of the
ranks 0..N-1, so one operator serves any set size (36 regions, or 12 words) and can
express max pooling, mean pooling, or anything between.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

#: Softmax temperature of the rank weights, as the authors fixed it.
TEMPERATURE = 0.1


def positional_encoding(length: int, dim: int) -> torch.Tensor:
    """(length, dim) sinusoidal encodings of positions 0..length-1 (dim even)."""
    if dim % 2:
        raise ValueError(f"positional encoding needs an even dimension, got {dim}")
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


class GPO(nn.Module):
    """(B, N, D) features with (B,) set sizes -> (B, D) pooled features.

    Positions at or past a sample's size are padding: they get no weight and never
    enter the sort."""

    def __init__(self, pe_dim: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.pe_dim = pe_dim
        self.gru = nn.GRU(pe_dim, hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(hidden, 1, bias=False)

    def weights(self, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, width, 1) rank weights summing to 1 over real ranks, and the (B, width, 1)
        bool mask of real positions."""
        device = self.linear.weight.device
        lengths = lengths.to(device)
        mask = (torch.arange(width, device=device)[None, :] < lengths[:, None])[..., None]
        pes = positional_encoding(width, self.pe_dim).to(device).expand(len(lengths), -1, -1)
        pes = pes * mask
        packed = pack_padded_sequence(pes, lengths.cpu().clamp_min(1), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=width)
        half = out.shape[-1] // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2)
        scores = scores.masked_fill(~mask, -10000.0)
        return torch.softmax(scores / TEMPERATURE, dim=1), mask

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        weights, mask = self.weights(lengths, features.shape[1])
        ranked = features.masked_fill(~mask, -10000.0).sort(dim=1, descending=True).values
        ranked = ranked.masked_fill(~mask, 0.0)
        return (ranked * weights).sum(dim=1)


__all__ = ["GPO", "positional_encoding"]
