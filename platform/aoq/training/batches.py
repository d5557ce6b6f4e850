"""Training batches: anchor pairs, and, once tables exist, their offline quintuplets.

A batch is fetched whole (``__getitems__``), not item by item: one gather from the
memory-mapped features and one vectorised padding of token ids per batch, instead of
B Python-level item fetches and a collate.

Two ways to cut an epoch into steps (``optim.batch_scope``):

* ``global`` (:class:`GlobalBatchSampler`): ``optim.batch_size`` pairs per step over all
  ranks. One permutation per epoch, cut into global batches; rank r takes the r-th of N
  equal slices of each. The offline draw of a pair is keyed by (seed, epoch, caption
  index) (``draws="pair"``). So the pairs of every step and their offline negatives are
  the same for any number of ranks.
* ``worker`` (:class:`EpochBatchSampler`): each rank draws its own batches of
  ``optim.batch_size`` from its shard, and the offline draws of a batch are keyed by
  (seed, epoch, rank, step) (``draws="batch"``): what aoq did before global batches.

Either way a batch is a pure function of its :class:`BatchRequest`: identical after a
resume and in whichever loader process fetches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from aoq.data.prepare import SplitArrays
from aoq.negatives.sampling import OfflineDraw, draw_offline, epoch_sampling_rng, sampling_rng
from aoq.negatives.tables import CandidateTables

#: How offline draws are keyed (see the module docstring).
DRAW_KEYS = ("batch", "pair")


@dataclass(frozen=True)
class BatchRequest:
    """What the sampler asks the dataset for.

    Attributes:
        epoch, step: where the batch is in training.
        caption_ids: (b,) int64 anchor captions of this rank.
        batch_caption_ids: (B,) int64 anchor captions of the whole step over all ranks
            (rank slices in rank order), or None when the rank's batch is the whole step.
    """

    epoch: int
    step: int
    caption_ids: np.ndarray
    batch_caption_ids: np.ndarray | None = None


@dataclass(frozen=True)
class Batch:
    """Model inputs for one rank's step.

    The step needs images and captions in blocks of b *slots*: block 0 holds the
    anchors; with offline negatives, image block 1 is I_off and block 2 is P_img,
    caption block 1 is T_off and block 2 is P_cap. One forward pass encodes all of them.

    Without slot maps, the rows of ``regions`` and ``tokens`` are the slots. With them,
    the rows are the *distinct* images and captions of the step (slots can repeat an
    item: I_off can be P_img, P_cap can be T_off, a partner can be another pair's
    anchor), the first b rows being the anchors in order, and ``image_slots[s]`` /
    ``caption_slots[s]`` is the row that slot s reads.

    Attributes:
        regions: (n_images, R, D) float32 region features.
        tokens: (n_captions, L) int64 ids, 0-padded.
        lengths: (n_captions,) int64 caption lengths.
        caption_ids: (b,) anchor caption indices.
        image_ids: (b,) anchor image indices.
        n_blocks: 1 (anchors only) or 3 (with offline quintuplets).
        image_slots: (n_blocks * b,) int64 row of each image slot, or None.
        caption_slots: (n_blocks * b,) int64 row of each caption slot, or None.
        batch_image_ids: (B,) image of every anchor pair of the whole step over all
            ranks (rank slices in rank order), or None when this batch is the whole step.
    """

    regions: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    caption_ids: torch.Tensor
    image_ids: torch.Tensor
    n_blocks: int
    image_slots: torch.Tensor | None = None
    caption_slots: torch.Tensor | None = None
    batch_image_ids: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.caption_ids.shape[0])

    @property
    def step_image_ids(self) -> torch.Tensor:
        """(B,) image of every anchor pair of the whole step (all ranks)."""
        return self.image_ids if self.batch_image_ids is None else self.batch_image_ids

    def to(self, device: torch.device | str) -> "Batch":
        non_blocking = torch.device(device).type == "cuda"
        moved = {name: value.to(device, non_blocking=non_blocking)
                 for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        return replace(self, **moved)


def distinct_rows(anchors: np.ndarray, partners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows a step encodes, and the row each slot reads.

    Args:
        anchors: (b,) ids of block 0, kept as they are (a model with an auxiliary loss
            reads the anchor pairs as the first b rows).
        partners: (m,) ids of the other blocks.

    Returns:
        rows: the anchors, then each partner id that is not an anchor, once (ascending).
        slots: (b + m,) index into ``rows`` of every anchor and partner.
    """
    b = len(anchors)
    unique, inverse = np.unique(partners, return_inverse=True)
    by_id = np.argsort(anchors, kind="stable")
    at = by_id[np.minimum(np.searchsorted(anchors, unique, sorter=by_id), b - 1)]
    found = anchors[at] == unique
    new = ~found
    row_of_unique = np.where(found, at, b + np.cumsum(new) - 1)
    rows = np.concatenate([anchors, unique[new]])
    slots = np.concatenate([np.arange(b), row_of_unique[inverse.reshape(-1)]])
    return rows, slots


def take_draw(draw: OfflineDraw, caption_ids: np.ndarray) -> OfflineDraw:
    """The entries of a whole-split draw (indexed by caption) for ``caption_ids``."""
    return OfflineDraw(*(np.asarray(getattr(draw, f.name))[caption_ids]
                         for f in fields(OfflineDraw)))


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
    """Caption-indexed training pairs of one split, with optional offline quintuplets.

    Args:
        split: the training split.
        seed, rank: what offline draws are keyed by (with the epoch, and the step or
            the caption; see ``draws``).
        sampling_range: h of the sampling rule (:mod:`aoq.negatives.sampling`).
        tables: candidate tables, or None (anchors only).
        draws: ``"pair"``: each pair's draw is keyed by (seed, epoch, caption index),
            whichever rank and step fetch it (one draw for the whole split per epoch,
            made on first use); ``"batch"``: a batch's draws are keyed by (seed, epoch,
            rank, step).
        deduplicate: encode each distinct image and caption of a batch once (slot maps
            in :class:`Batch`); False stacks every slot, the straightforward layout.
    """

    def __init__(
        self,
        split: SplitArrays,
        *,
        seed: int = 0,
        rank: int = 0,
        sampling_range: int = 300,
        tables: CandidateTables | None = None,
        draws: str = "batch",
        deduplicate: bool = False,
        range_min: int = 0,
    ) -> None:
        if draws not in DRAW_KEYS:
            raise ValueError(f"draws={draws!r}: must be one of {DRAW_KEYS}")
        self.split = split
        self.seed, self.rank = seed, rank
        self.sampling_range, self.range_min = sampling_range, range_min
        self.tables = tables
        self.draws = draws
        self.deduplicate = deduplicate
        self._epoch_draw: tuple[int, OfflineDraw] | None = None

    def __len__(self) -> int:
        return self.split.n_captions

    def set_tables(self, tables: CandidateTables | None) -> None:
        """Switch candidate tables (takes effect for batches fetched afterwards)."""
        self.tables = tables
        self._epoch_draw = None

    def offline_draw(self, request: BatchRequest) -> OfflineDraw:
        """The offline partners of the request's anchors (tables must be set)."""
        tables = self.tables
        assert tables is not None
        cpi = self.split.captions_per_image
        if self.draws == "batch":
            rng = sampling_rng(self.seed, request.epoch, self.rank, request.step)
            return draw_offline(request.caption_ids, tables.i2t, tables.t2i,
                                self.sampling_range, rng, cpi, self.range_min)
        if self._epoch_draw is None or self._epoch_draw[0] != request.epoch:
            # Every caption is an anchor once per epoch, so drawing for all of them at
            # once costs what the epoch's batches would, and makes entry j depend on
            # (seed, epoch, j) only.
            whole = draw_offline(np.arange(len(self)), tables.i2t, tables.t2i,
                                 self.sampling_range,
                                 epoch_sampling_rng(self.seed, request.epoch), cpi,
                                 self.range_min)
            self._epoch_draw = (request.epoch, whole)
        return take_draw(self._epoch_draw[1], np.asarray(request.caption_ids, dtype=np.int64))

    def __getitem__(self, index: int) -> Batch:  # pragma: no cover - batch access is used
        return self.__getitems__(BatchRequest(0, 0, np.array([index], dtype=np.int64)))

    def __getitems__(self, request: BatchRequest) -> Batch:
        cpi = self.split.captions_per_image
        caps = np.asarray(request.caption_ids, dtype=np.int64)
        imgs = caps // cpi
        image_slots = caption_slots = None
        if self.tables is not None:
            draw = self.offline_draw(request)
            image_partners = np.concatenate([draw.image_negative,
                                             draw.image_of_caption_negative])
            caption_partners = np.concatenate([draw.caption_negative,
                                               draw.caption_of_image_negative])
            if self.deduplicate:
                image_ids, image_slots = distinct_rows(imgs, image_partners)
                caption_ids, caption_slots = distinct_rows(caps, caption_partners)
            else:
                image_ids = np.concatenate([imgs, image_partners])
                caption_ids = np.concatenate([caps, caption_partners])
            blocks = 3
        else:
            image_ids, caption_ids, blocks = imgs, caps, 1
        tokens, lengths = self.split.tokens.batch(caption_ids)
        whole = request.batch_caption_ids
        return Batch(
            regions=gather_regions(self.split.images, image_ids),
            tokens=tokens,
            lengths=lengths,
            caption_ids=torch.from_numpy(caps),
            image_ids=torch.from_numpy(imgs),
            n_blocks=blocks,
            image_slots=None if image_slots is None else torch.from_numpy(image_slots),
            caption_slots=None if caption_slots is None else torch.from_numpy(caption_slots),
            batch_image_ids=(None if whole is None else
                             torch.from_numpy(np.asarray(whole, dtype=np.int64) // cpi)),
        )


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """(n,) int64: the order of an epoch, a permutation drawn from (seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).numpy()


class GlobalBatchSampler:
    """Global batches of ``batch_size`` pairs, each split evenly over the ranks.

    Each epoch is one permutation drawn from (seed, epoch), cut into consecutive global
    batches; rank r takes the r-th of ``world`` equal slices of each, so the slices of
    one step, in rank order, are the global batch whatever ``world`` is. A trailing
    partial global batch is dropped (so every step has ``batch_size`` pairs and every
    rank the same number of steps, for any ``world``); the permutation changes every
    epoch, so no pair is left out for good.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1 or batch_size % world or not 0 <= rank < world:
            raise ValueError(f"a global batch of {batch_size} does not split evenly over "
                             f"{world} ranks (rank {rank})")
        if n < batch_size:
            raise ValueError(f"{n} pairs make no global batch of {batch_size}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    @property
    def per_rank(self) -> int:
        """Pairs each rank takes per step."""
        return self.batch_size // self.world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[BatchRequest]:
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        for step in range(len(self)):
            whole = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield BatchRequest(self.epoch, step, whole[mine], batch_caption_ids=whole)


class EpochBatchSampler:
    """Shuffled, rank-sharded batches of caption indices, like DistributedSampler
    (``optim.batch_scope=worker``: every rank its own batch of ``batch_size``).

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
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        mine = order[: (self.n // self.world) * self.world][self.rank:: self.world]
        for step, start in enumerate(range(0, len(mine), self.batch_size)):
            yield BatchRequest(self.epoch, step, mine[start: start + self.batch_size].astype(np.int64))


def passthrough(batch: Batch) -> Batch:
    """DataLoader collate for datasets that already return whole batches."""
    return batch


def make_loader(dataset: PairDataset, sampler: GlobalBatchSampler | EpochBatchSampler,
                workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over whole batches (``__getitems__``)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=passthrough, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=False,
    )
