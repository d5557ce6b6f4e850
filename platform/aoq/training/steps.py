"""One training step and one training epoch, independent of Ray.

The step encodes every distinct image and caption of a batch in a single forward pass
(anchors and, when present, the offline negatives and their positives), so DDP
synchronises gradients once and the encoders see one large batch instead of three
small ones.

With several ranks and a global batch (``gather=True``), every rank holds b = B / N
anchor pairs. It gathers the anchor captions' encodings from every rank, scores its own
anchor images against all B captions (its b rows of the B x B matrix), and gathers the
rows and the offline score vectors: every rank then holds the whole step's scores and
computes the same loss, the one a single process computes on the B pairs. The gathers
carry gradients: the backward of a gather sums the N ranks' (identical) gradients into
each rank's own encodings, N times the single-process gradient, and DDP's all-reduce
averages over the N ranks, so the step's gradient is the single-process gradient and
the learning rate means the same for any N. An auxiliary loss (VSRN's captioner) is a
mean over each rank's anchors, which DDP's average turns into the mean over all B.

Cross-attention models gather the word encodings of the anchor captions (zero-padded to
the longest rank's; padding words carry a 0 mask and never reach a score), not region
features: a rank's rows need its own images only. Each rank then scores b x B pairs, the
single process's B x B split N ways.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from aoq.losses import AOQLoss, OfflineScores
from aoq.models.base import RetrievalModel
from aoq.training import distributed
from aoq.training.batches import Batch
from aoq.training.memory import MemoryWatch


def unwrap(model: torch.nn.Module) -> RetrievalModel:
    """The model inside a DDP (or other ``.module``) wrapper."""
    return getattr(model, "module", model)  # type: ignore[return-value]


def encode_slots(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a batch's rows once and lay them out by slot.

    Returns:
        (n_blocks * b, ...) image and caption encodings, block by block (see
        :class:`~aoq.training.batches.Batch`).
    """
    images, captions = model(batch.regions, batch.tokens, batch.lengths, pairs=batch.size)
    if batch.image_slots is not None:
        images = images.index_select(0, batch.image_slots)
    if batch.caption_slots is not None:
        captions = captions.index_select(0, batch.caption_slots)
    return images, captions


def batch_scores(
    model: torch.nn.Module, batch: Batch, *, gather: bool = False, offline: bool = True
) -> tuple[torch.Tensor, OfflineScores | None]:
    """Encode a batch and score it.

    Args:
        gather: score against the anchors of every rank (a global batch; see the module
            docstring); a no-op with one rank.
        offline: score the offline blocks, if the batch has them.

    Returns:
        The (B, B) score matrix of the step's anchors (image rows, caption columns,
        positives on the diagonal; B = b, or b times the ranks when gathering) and, for
        a batch with offline blocks, the four (B,) offline score vectors.
    """
    images, captions = encode_slots(model, batch)
    core = unwrap(model)
    b = batch.size
    anchor_i, anchor_c = images[:b], captions[:b]
    if gather and distributed.is_distributed():
        columns = (distributed.all_gather_with_grad(anchor_c) if core.has_global_embedding
                   else distributed.all_gather_padded(anchor_c))
        scores = distributed.all_gather_with_grad(core.similarity(anchor_i, columns))
    else:
        scores = core.similarity(anchor_i, anchor_c)
    if batch.n_blocks == 1 or not offline:
        return scores, None
    image_neg, image_of_cap_neg = images[b:2 * b], images[2 * b:3 * b]
    caption_neg, caption_of_image_neg = captions[b:2 * b], captions[2 * b:3 * b]
    pairs = torch.stack([
        core.paired_similarity(anchor_i, caption_neg),
        core.paired_similarity(image_neg, anchor_c),
        core.paired_similarity(image_neg, caption_neg),
        core.paired_similarity(image_of_cap_neg, caption_of_image_neg),
    ], dim=1)  # (b, 4)
    if gather:
        pairs = distributed.all_gather_with_grad(pairs)
    return scores, OfflineScores(*pairs.unbind(dim=1))


@dataclass
class EpochStats:
    """Averages over an epoch's steps (per-term losses are per-batch sums, averaged)."""

    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    #: Per-anchor hardness S(I, T_neg) - S(I, T) of the online (hardest in-batch) and
    #: offline caption negatives, when collected: how close negatives come to positives.
    hardness: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_seconds / self.seconds if self.seconds else 0.0

    def as_metrics(self, prefix: str = "train/") -> dict[str, float]:
        out = {f"{prefix}{k}": v for k, v in self.terms.items()}
        out[f"{prefix}samples_per_s"] = self.samples_per_second
        out[f"{prefix}data_wait_fraction"] = self.data_wait_fraction
        out[f"{prefix}epoch_seconds"] = self.seconds
        for name, values in self.hardness.items():
            if len(values):
                out[f"{prefix}hardness_{name}_mean"] = float(values.mean())
        return out


def caption_hardness(scores: torch.Tensor, offline: OfflineScores | None
                     ) -> dict[str, torch.Tensor]:
    """(B,) margins S(I, T_neg) - S(I, T) of each anchor's hardest in-batch caption and,
    with offline scores, of its offline caption negative (> 0: the negative wins)."""
    positive = scores.diagonal()
    off_diagonal = scores.masked_fill(
        torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device), float("-inf"))
    out = {"online": off_diagonal.max(dim=1).values - positive}
    if offline is not None:
        out["offline"] = offline.image_caption_off - positive
    return {k: v.detach() for k, v in out.items() if torch.isfinite(v).all()}


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    loss_fn: AOQLoss,
    optimizer: torch.optim.Optimizer,
    *,
    grad_clip: float,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
    hardness_samples: int = 0,
    memory: MemoryWatch | None = None,
    gather: bool = False,
) -> EpochStats:
    """Run one pass over ``batches`` and return averaged statistics.

    Offline blocks in a batch are ignored by a loss that does not need them (``triplet``
    during warm-up reads only the anchors), and a loss that needs them fails loudly on a
    batch without them. With ``hardness_samples > 0``, up to that many per-anchor
    hardness values are kept (see :func:`caption_hardness`). ``memory`` is sampled after
    every step (its peaks are the most a worker needs). ``gather``: the batches are
    ranks' slices of global batches (see the module docstring); the loss terms are then
    the whole step's, the same on every rank.
    """
    model.train()
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    stats = EpochStats()
    hardness: dict[str, list[torch.Tensor]] = defaultdict(list)
    kept = 0
    start = time.perf_counter()
    fetch_start = start
    for batch in batches:
        stats.data_seconds += time.perf_counter() - fetch_start
        batch = batch.to(device)
        scores, offline = batch_scores(model, batch, gather=gather,
                                       offline=loss_fn.needs_offline)
        loss = loss_fn(scores, offline, batch.step_image_ids if gather else batch.image_ids)
        aux = unwrap(model).auxiliary_loss()
        if aux is not None:
            loss = loss + aux
            sums["auxiliary"] += aux.detach()
        if kept < hardness_samples:
            for name, values in caption_hardness(scores, offline).items():
                hardness[name].append(values.cpu())
            kept += scores.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        sums["loss"] += loss.detach()
        for name, value in loss_fn.last_terms.items():
            sums[name] += value
        stats.steps += 1
        stats.samples += batch.size
        if on_step is not None:
            on_step(stats.steps, float(loss.detach()))
        if memory is not None:
            memory.sample()
        fetch_start = time.perf_counter()
    stats.seconds = time.perf_counter() - start
    stats.terms = {k: float(v) / max(stats.steps, 1) for k, v in sums.items()}
    stats.hardness = {k: torch.cat(v).numpy() for k, v in hardness.items()}
    if not math.isfinite(stats.terms.get("loss", 0.0)):
        raise FloatingPointError(f"training loss became {stats.terms['loss']}; lower optim.lr "
                                 "or check the data")
    return stats
