"""Candidates as single int64 keys, so one integer sort is the exact brute-force order.

A key is ``group | rank | index``: the group (a row or column of the current block) in
the top bits, then a 32-bit order-reversing integer image of the fp32 score, then the
*original* index of the other side in the low ``index_bits`` bits. One sort of the keys
(:func:`aoq.search.kernels.sort_unique`) orders each group by score descending, then
index ascending, whatever the order the candidates were found in: ties cost nothing.
"""

from __future__ import annotations

import torch

__all__ = ["bits_for", "first_k", "make_keys", "rank_bits", "value_of"]


def bits_for(n: int) -> int:
    """Bits needed to store 0 .. n - 1 (at least 1)."""
    return max(1, (n - 1).bit_length())


def rank_bits(values: torch.Tensor) -> torch.Tensor:
    """float32 (any shape) -> int64 in [0, 2**32) that strictly *decreases* as the value
    increases.

    Exact and total on finite floats, with -0.0 and +0.0 mapped to one key (they are
    equal scores, so they must tie and fall back to the index order).
    """
    bits = (values + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    # Flip the magnitude bits of negative floats: the int32 order becomes the float order.
    ascending = bits >> 31
    ascending &= 0x7FFFFFFF
    ascending ^= bits
    rank = ascending.to(torch.int64)
    return rank.neg_().add_(0x7FFFFFFF)


def value_of(rank: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rank_bits` (int64 in [0, 2**32) -> float32, same shape)."""
    ascending = (0x7FFFFFFF - rank).to(torch.int32)
    return (ascending ^ ((ascending >> 31) & 0x7FFFFFFF)).view(torch.float32)


def make_keys(values: torch.Tensor, group: torch.Tensor, index: torch.Tensor,
              index_bits: int) -> torch.Tensor:
    """``group | score rank | index`` packed in an int64 (group in the top bits).

    All three are 1-D of one length (n,); ``index < 2**index_bits`` and
    ``group < 2**(31 - index_bits)``, so the key stays non-negative.
    """
    key = rank_bits(values)
    key <<= index_bits
    key |= index
    key |= group << (32 + index_bits)
    return key


def first_k(sorted_keys: torch.Tensor, n_groups: int, k: int, index_bits: int, *,
            group_offset: int = 0, want_values: bool = True
            ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The first k keys of each group ``group_offset .. group_offset + n_groups - 1``.

    Args:
        sorted_keys: (n,) int64 keys from :func:`make_keys`, sorted ascending.

    Returns:
        ``(values (G, k) float32 or None, indices (G, k) int64, ok (G,) bool)``; rows with
        ``ok == False`` (fewer than k keys) hold garbage and must be recomputed.
    """
    dev = sorted_keys.device
    if sorted_keys.numel() == 0:
        values = torch.zeros(n_groups, k, dtype=torch.float32, device=dev) if want_values else None
        return (values, torch.zeros(n_groups, k, dtype=torch.int64, device=dev),
                torch.zeros(n_groups, dtype=torch.bool, device=dev) if k else
                torch.ones(n_groups, dtype=torch.bool, device=dev))
    group = sorted_keys >> (32 + index_bits)
    if group_offset:
        group -= group_offset
    counts = torch.bincount(group, minlength=n_groups)
    ok = counts >= k
    starts = torch.cumsum(counts, 0) - counts
    take = (starts[:, None] + torch.arange(k, device=dev)).clamp_(max=sorted_keys.numel() - 1)
    chosen = sorted_keys[take]
    indices = chosen & ((1 << index_bits) - 1)
    values = value_of((chosen >> index_bits) & 0xFFFFFFFF) if want_values else None
    return values, indices, ok
