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
def encode_split(
    model: RetrievalModel,
    split: SplitArrays,
    *,
    max_images: int = 0,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodings of the first ``max_images`` images (0 = all) and their captions.

    Returns:
        (n_images, ...) image encodings and (cpi * n_images, ...) caption encodings, on
        the model's device.
    """
    device = _device_of(model)
    n_images = split.n_images if max_images <= 0 else min(max_images, split.n_images)
    n_captions = n_images * split.captions_per_image
    was_training = model.training
    model.eval()
    try:
        images = []
        for start in range(0, n_images, batch_size):
            stop = min(start + batch_size, n_images)
            feats = np.array(split.images[start:stop], dtype=np.float32)
            images.append(model.encode_images(torch.from_numpy(feats).to(device)))
        captions = []
        for start in range(0, n_captions, batch_size):
            ids = np.arange(start, min(start + batch_size, n_captions))
            tokens, lengths = split.tokens.batch(ids)
            captions.append(model.encode_captions(tokens.to(device), lengths.to(device)))
    finally:
        model.train(was_training)
    return torch.cat(images), torch.cat(captions)


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
