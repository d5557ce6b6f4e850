"""Rank communication for a training job: broadcast, barrier, and gathering a step's
encodings and scores across ranks with their gradients.

Kept apart from the training code (as open_clip keeps ``distributed.py`` apart from
``train.py``) so that the session reads as single-process code: every helper here is a
no-op with one rank or when ``torch.distributed`` is not initialised (a unit test, a
notebook), and the real collective otherwise (gloo on CPU, NCCL on GPU, set up by
whoever launched the ranks; for aoq that is Ray Train).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
# The differentiable collectives torch 2.13 points to (its torch.distributed.nn
# all_gather is deprecated, and on gloo runs its backward as N scatters: ~8x slower).
import torch.distributed._functional_collectives as collectives
import torch.nn.functional as F

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable value); also a barrier."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's (n, ...) ``x``, concatenated in rank order: (world * n, ...).

    Differentiable: the backward pass sums, for each rank's ``x``, the gradients every
    rank computed for its slice (a reduce-scatter). Every rank must pass the same shape.
    """
    if not is_distributed():
        return x
    gathered = collectives.all_gather_single(x.contiguous(), 0, dist.group.WORLD)
    return collectives.wait_tensor(gathered)


def all_gather_padded(x: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_with_grad` for (n, L, ...) tensors whose length L differs
    between ranks: each is zero-padded along dim 1 to the longest first (one small
    all-reduce), so the result is (world * n, max L, ...)."""
    if not is_distributed():
        return x
    longest = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    pad = int(longest) - x.shape[1]
    if pad:
        # F.pad lists (before, after) pairs from the last dim backwards.
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return all_gather_with_grad(x)


def rank_zero_value(rank: int, compute: Any) -> Any:
    """Run ``compute()`` on rank 0 only and hand its result to every rank.

    An exception on rank 0 is handed over too and re-raised on every rank, so no rank
    waits forever for a value that will never come.
    """
    value: Any = None
    if rank == 0:
        try:
            value = compute()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            value = _Failure(exc)
    value = broadcast_object(value)
    if isinstance(value, _Failure):
        raise value.error
    return value


class _Failure:
    """An exception in transit from rank 0 (a plain wrapper: exceptions pickle)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
