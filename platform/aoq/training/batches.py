"""Training batches: anchor pairs, and, once tables exist, their offline quintuplets.

A batch is fetched whole (``__getitems__``), not item by item: one gather from the
memory-mapped features and one vectorised padding of token ids per batch, instead of
B Python-level item fetches and a collate.

The batch sampler yields :class:`BatchRequest` objects that carry (epoch, step), so the
offline draw of every batch is a pure function of (seed, epoch, rank, step): identical
after a resume and in whichever loader process fetches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from aoq.data.prepare import SplitArrays
from aoq.negatives.sampling import draw_offline, sampling_rng
from aoq.negatives.tables import CandidateTables


@dataclass(frozen=True)
class BatchRequest:
    """What the sampler asks the dataset for."""

    epoch: int
    step: int
    caption_ids: np.ndarray  # (B,) int64


@dataclass(frozen=True)
class Batch:
    """Model inputs for one step.

    Images and captions are stacked in blocks of B: block 0 holds the anchors; with
    offline negatives, images block 1 is I_off and block 2 is P_img, captions block 1 is
    T_off and block 2 is P_cap. One forward pass encodes all of them.

    Attributes:
        regions: (n_blocks * B, R, D) float32 region features.
        tokens: (n_blocks * B, L) int64 ids, 0-padded.
        lengths: (n_blocks * B,) int64 caption lengths.
        caption_ids: (B,) anchor caption indices.
        image_ids: (B,) anchor image indices.
        n_blocks: 1 (anchors only) or 3 (with offline quintuplets).
    """

    regions: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    caption_ids: torch.Tensor
    image_ids: torch.Tensor
    n_blocks: int

    @property
    def size(self) -> int:
        return int(self.caption_ids.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        non_blocking = torch.device(device).type == "cuda"
        return replace(
            self,
            regions=self.regions.to(device, non_blocking=non_blocking),
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            lengths=self.lengths.to(device, non_blocking=non_blocking),
            caption_ids=self.caption_ids.to(device, non_blocking=non_blocking),
            image_ids=self.image_ids.to(device, non_blocking=non_blocking),
        )


def gather_regions(images: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    """(len(ids), R, D) float32 rows of a (memory-mapped) feature array.

    Rows are read in ascending order (one pass over the file regions touched), then put
    back in the requested order.
    """
    order = np.argsort(ids, kind="stable")
    rows = np.asarray(images[ids[order]], dtype=np.float32)
    out = np.empty_like(rows)
    out[order] = rows
    return torch.from_numpy(out)


class PairDataset(torch.utils.data.Dataset):
    """Caption-indexed training pairs of one split, with optional offline quintuplets."""

    def __init__(
        self,
        split: SplitArrays,
        *,
        seed: int = 0,
        rank: int = 0,
        sampling_range: int = 300,
        tables: CandidateTables | None = None,
        range_min: int = 0,
    ) -> None:
        self.split = split
        self.seed, self.rank = seed, rank
        self.sampling_range, self.range_min = sampling_range, range_min
        self.tables = tables

    def __len__(self) -> int:
        return self.split.n_captions

    def set_tables(self, tables: CandidateTables | None) -> None:
        """Switch candidate tables (takes effect for batches fetched afterwards)."""
        self.tables = tables

    def __getitem__(self, index: int) -> Batch:  # pragma: no cover - batch access is used
        return self.__getitems__(BatchRequest(0, 0, np.array([index], dtype=np.int64)))

    def __getitems__(self, request: BatchRequest) -> Batch:
        cpi = self.split.captions_per_image
        caps = np.asarray(request.caption_ids, dtype=np.int64)
        imgs = caps // cpi
        if self.tables is not None:
            draw = draw_offline(
                caps, self.tables.i2t, self.tables.t2i, self.sampling_range,
                sampling_rng(self.seed, request.epoch, self.rank, request.step), cpi,
                self.range_min,
            )
            image_ids = np.concatenate([imgs, draw.image_negative, draw.image_of_caption_negative])
            caption_ids = np.concatenate([caps, draw.caption_negative,
                                          draw.caption_of_image_negative])
            blocks = 3
        else:
            image_ids, caption_ids, blocks = imgs, caps, 1
        tokens, lengths = self.split.tokens.batch(caption_ids)
        return Batch(
            regions=gather_regions(self.split.images, image_ids),
            tokens=tokens,
            lengths=lengths,
            caption_ids=torch.from_numpy(caps),
            image_ids=torch.from_numpy(imgs),
            n_blocks=blocks,
        )


class EpochBatchSampler:
    """Shuffled, rank-sharded batches of caption indices, like DistributedSampler.

    Each epoch is a permutation drawn from (seed, epoch); rank r takes every world-th
    index of it, so ranks see disjoint data and the same number of batches (trailing
    indices that do not divide evenly are dropped, as DDP needs equal step counts).
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1 or n < world:
            raise ValueError(f"cannot shard {n} items over {world} ranks in batches of "
                             f"{batch_size}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = self.n // self.world
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[BatchRequest]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        mine = order[: (self.n // self.world) * self.world][self.rank:: self.world]
        for step, start in enumerate(range(0, len(mine), self.batch_size)):
            yield BatchRequest(self.epoch, step, mine[start: start + self.batch_size].astype(np.int64))


def passthrough(batch: Batch) -> Batch:
    """DataLoader collate for datasets that already return whole batches."""
    return batch


def make_loader(dataset: PairDataset, sampler: EpochBatchSampler, workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over whole batches (``__getitems__``)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=passthrough, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=False,
    )
