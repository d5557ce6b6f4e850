"""Encode a split with a model and score it, in batches, without gradients.

Global-embedding models score the split with one matrix product; the score matrix of a
1000-image test split is 1000 x 5000 floats (20 MB), and COCO 5K's is 500 MB, so it is
built in image-row blocks with the caption encodings kept once.
"""

from __future__ import annotations

import numpy as np
import torch

from aoq.data.prepare import SplitArrays
from aoq.models.base import RetrievalModel


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_range(
    model: RetrievalModel,
    split: SplitArrays,
    start: int,
    stop: int,
    *,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodings of images ``[start, stop)`` and of their captions.

    Batches are cut on a grid fixed by the split, not by the range: batch b always holds
    images ``[b * batch_size, (b + 1) * batch_size)`` and their ``cpi * batch_size``
    captions. Matrix products (and the GRU's per-step GEMMs) round differently with the
    batch shape, so this grid is what makes a range aligned to ``batch_size``, encoded in
    a mining actor, bit-identical to the same rows of :func:`encode_split`, and the
    sharded tables equal to the single-process ones.

    Returns:
        (stop - start, ...) image encodings and (cpi * (stop - start), ...) caption
        encodings, on the model's device.
    """
    device = _device_of(model)
    cpi = split.captions_per_image
    was_training = model.training
    model.eval()
    try:
        images, captions = [], []
        first = start - start % batch_size
        for lo in range(first, stop, batch_size):
            a, b = max(lo, start), min(lo + batch_size, stop)
            feats = np.array(split.images[a:b], dtype=np.float32)
            images.append(model.encode_images(torch.from_numpy(feats).to(device)))
            tokens, lengths = split.tokens.batch(np.arange(a * cpi, b * cpi))
            captions.append(model.encode_captions(tokens.to(device), lengths.to(device)))
    finally:
        model.train(was_training)
    return torch.cat(images), torch.cat(captions)


def encode_split(
    model: RetrievalModel,
    split: SplitArrays,
    *,
    max_images: int = 0,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodings of the first ``max_images`` images (0 = all) and their captions, in
    batches of ``batch_size`` images (see :func:`encode_range`).

    Returns:
        (n_images, ...) image encodings and (cpi * n_images, ...) caption encodings, on
        the model's device.
    """
    n_images = split.n_images if max_images <= 0 else min(max_images, split.n_images)
    return encode_range(model, split, 0, n_images, batch_size=batch_size)


@torch.no_grad()
def score_split(
    model: RetrievalModel,
    split: SplitArrays,
    *,
    max_images: int = 0,
    batch_size: int = 256,
    block_images: int = 1024,
) -> np.ndarray:
    """The (n_images, cpi * n_images) float32 score matrix of a split."""
    images, captions = encode_split(model, split, max_images=max_images, batch_size=batch_size)
    out = np.empty((images.shape[0], captions.shape[0]), dtype=np.float32)
    for start in range(0, images.shape[0], block_images):
        block = model.similarity(images[start:start + block_images], captions)
        out[start:start + block.shape[0]] = block.float().cpu().numpy()
    return out
