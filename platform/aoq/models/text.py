"""Per-word caption features: a (Bi)GRU over word embeddings, as SCAN, BFAN and
VSE-infinity's BiGRU variant use it (VSE++ and VSRN keep only the last hidden state;
see :class:`aoq.models.vse.GRUTextEncoder`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class GRUWordEncoder(nn.Module):
    """(B, L) token ids with (B,) lengths -> (B, L, E) word features (zeros past each
    length). A bidirectional GRU's two directions are averaged, as all three authors do,
    so E is the hidden size either way."""

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, layers: int,
                 bidirectional: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers=layers, batch_first=True,
                          bidirectional=bidirectional)
        self.bidirectional = bidirectional
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths.detach().cpu().clamp_min(1),
                                      batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        # total_length keeps the padded width of the input, so encodings of one batch
        # line up with its token tensor whatever its longest caption is.
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        if self.bidirectional:
            half = out.shape[-1] // 2
            out = (out[..., :half] + out[..., half:]) / 2
        return out


__all__ = ["GRUWordEncoder"]
