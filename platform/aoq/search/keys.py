"""Candidates as single int64 keys, so one integer sort is the exact brute-force order.

A key is ``group | rank | index``: the group (a row or column of the current block) in
the top bits, then a 32-bit order-reversing integer image of the fp32 score, then the
*original* index of the other side in the low ``index_bits`` bits. One sort of the keys
(:func:`aoq.search.kernels.sort_unique`) orders each group by score descending, then
index ascending, whatever the order the candidates were found in: ties cost nothing.
"""

from __future__ import annotations

import torch

from aoq.search.kernels import gather

__all__ = ["bits_for", "first_k", "kth_score", "make_keys", "rank_bits", "value_of"]


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
    starts, counts = _group_runs(sorted_keys, n_groups, index_bits, group_offset)
    take = (starts[:, None] + torch.arange(k, device=dev)).clamp_(max=sorted_keys.numel() - 1)
    chosen = gather(sorted_keys, take.view(-1)).view(n_groups, k)
    indices = chosen & ((1 << index_bits) - 1)
    values = value_of((chosen >> index_bits) & 0xFFFFFFFF) if want_values else None
    return values, indices, counts >= k


def kth_score(sorted_keys: torch.Tensor, n_groups: int, k: int, index_bits: int
              ) -> torch.Tensor:
    """(G,) float32: the score of each group's k-th key, as :func:`first_k` would return
    in its last column (garbage for groups with fewer than k keys), without decoding
    the other k - 1."""
    if sorted_keys.numel() == 0:
        return torch.zeros(n_groups, dtype=torch.float32, device=sorted_keys.device)
    starts, _ = _group_runs(sorted_keys, n_groups, index_bits, 0)
    kth = gather(sorted_keys, (starts + (k - 1)).clamp_(max=sorted_keys.numel() - 1))
    return value_of((kth >> index_bits) & 0xFFFFFFFF)


def _group_runs(sorted_keys: torch.Tensor, n_groups: int, index_bits: int,
                group_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, counts), each (G,) int64: where each group's run of keys begins in
    ``sorted_keys`` and how long it is."""
    # Group g's keys are one run, starting at the first key >= g's smallest possible
    # key: G + 1 binary searches instead of a pass over every key.
    firsts = (torch.arange(n_groups + 1, device=sorted_keys.device) + group_offset
              ) << (32 + index_bits)
    bounds = torch.searchsorted(sorted_keys, firsts)
    return bounds[:-1], bounds[1:] - bounds[:-1]
