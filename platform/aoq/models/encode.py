"""Encode (parts of) a split with a model, in batches, in eval mode, without gradients.

Batches always sit on a grid fixed by the split (see :func:`encode_range`), so any range
aligned to the batch size encodes bit-identically wherever it is computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from aoq.data.prepare import SplitArrays
from aoq.models.base import RetrievalModel


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, BatchNorm running stats) and no gradients, restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _grid(start: int, stop: int, batch_size: int, progress: str | None = None):
    """(a, b) image ranges of the batches covering [start, stop) on the split's grid;
    with ``progress``, a bar of that name counts the images."""
    bar = tqdm(total=stop - start, desc=progress, unit="img", disable=progress is None)
    with bar:
        for lo in range(start - start % batch_size, stop, batch_size):
            a, b = max(lo, start), min(lo + batch_size, stop)
            yield a, b
            bar.update(b - a)


def encode_images_range(model: RetrievalModel, split: SplitArrays, start: int, stop: int,
                        *, batch_size: int = 256, progress: str | None = None
                        ) -> torch.Tensor:
    """(stop - start, ...) encodings of images ``[start, stop)`` (see :func:`encode_range`);
    ``progress`` names a progress bar."""
    device = _device_of(model)
    with eval_mode(model):
        parts = [model.encode_images(torch.from_numpy(
            np.array(split.images[a:b], dtype=np.float32)).to(device))
            for a, b in _grid(start, stop, batch_size, progress)]
        return model.concat_encodings(parts)


def encode_captions_range(model: RetrievalModel, split: SplitArrays, start: int, stop: int,
                          *, batch_size: int = 256, progress: str | None = None
                          ) -> torch.Tensor:
    """(cpi * (stop - start), ...) encodings of the captions of images ``[start, stop)``;
    ``progress`` names a progress bar."""
    device = _device_of(model)
    cpi = split.captions_per_image
    parts = []
    with eval_mode(model):
        for a, b in _grid(start, stop, batch_size, progress):
            tokens, lengths = split.tokens.batch(np.arange(a * cpi, b * cpi))
            parts.append(model.encode_captions(tokens.to(device), lengths.to(device)))
        return model.concat_encodings(parts)


def encode_range(
    model: RetrievalModel,
    split: SplitArrays,
    start: int,
    stop: int,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodings of images ``[start, stop)`` and of their captions, in eval mode, with
    progress bars when ``progress``.

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
    return (encode_images_range(model, split, start, stop, batch_size=batch_size,
                                progress="encoding images" if progress else None),
            encode_captions_range(model, split, start, stop, batch_size=batch_size,
                                  progress="encoding captions" if progress else None))


def encode_split(
    model: RetrievalModel,
    split: SplitArrays,
    *,
    max_images: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodings of the first ``max_images`` images (0 = all) and their captions, in
    batches of ``batch_size`` images (see :func:`encode_range`); progress bars when
    ``progress``.

    Returns:
        (n_images, ...) image encodings and (cpi * n_images, ...) caption encodings, on
        the model's device.
    """
    n_images = split.n_images if max_images <= 0 else min(max_images, split.n_images)
    return encode_range(model, split, 0, n_images, batch_size=batch_size, progress=progress)
