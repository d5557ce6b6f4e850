"""Drawing offline negatives from candidate tables, by the authors' rule
(docs/architecture.md, "The method").

For an anchor pair (image i, caption j) one draw n ~ U{r..h-1} picks both negatives
(h = ``negatives.sampling_range``; r = ``negatives.range_min``, 0 by default as in the
paper, skips the top r candidates, the likeliest false negatives):
the caption negative T_off = i2t[i, n] and the image negative I_off = t2i[j, n // 5]
(so images come from the top h/5 of t2i). Their positives complete the quintuplet:
P_img = T_off // 5 (the image T_off describes) and P_cap = a random caption of I_off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aoq.data.errors import DataError

# Separates these streams from any other generator seeded with the same numbers.
_DOMAIN = 0xA0C


@dataclass(frozen=True)
class OfflineDraw:
    """Offline partners of B anchors; every field is (B,) int64.

    Attributes:
        caption_negative: T_off, a caption index (not a caption of the anchor image).
        image_negative: I_off, an image index (not the anchor caption's image).
        image_of_caption_negative: P_img = T_off // captions_per_image.
        caption_of_image_negative: P_cap, one caption index of I_off.
    """

    caption_negative: np.ndarray
    image_negative: np.ndarray
    image_of_caption_negative: np.ndarray
    caption_of_image_negative: np.ndarray


def draw_offline(
    caption_ids: np.ndarray,
    i2t: np.ndarray,
    t2i: np.ndarray,
    sampling_range: int,
    rng: np.random.Generator,
    captions_per_image: int = 5,
    range_min: int = 0,
) -> OfflineDraw:
    """Draw one offline quintuplet per anchor caption.

    Args:
        caption_ids: (B,) anchor caption indices; anchor image = caption_id // cpi.
        i2t: (n_images, K_c) candidate captions per image, best first (may be a memmap).
        t2i: (n_captions, K_i) candidate images per caption, best first.
        sampling_range: h; requires h <= K_c and ceil(h / cpi) <= K_i.
        rng: the generator; the caller seeds it from where the draw is in training
            (:func:`sampling_rng`, :func:`epoch_sampling_rng`) so that draws are
            reproducible and independent of loader processes.
        range_min: r, the first rank drawn (0 <= r < h): n ~ U{r..h-1}.

    Raises:
        CorruptTableError: if a table hands back a positive as a negative.
    """
    caption_ids = np.asarray(caption_ids, dtype=np.int64)
    if sampling_range > i2t.shape[1] or -(-sampling_range // captions_per_image) > t2i.shape[1]:
        raise ValueError(f"sampling_range={sampling_range} does not fit tables of width "
                         f"{i2t.shape[1]} (i2t) and {t2i.shape[1]} (t2i)")
    if not 0 <= range_min < sampling_range:
        raise ValueError(f"range_min={range_min} must be in 0..sampling_range-1 "
                         f"({sampling_range - 1})")
    images = caption_ids // captions_per_image
    n = rng.integers(range_min, sampling_range, size=len(caption_ids))
    caption_negative = np.asarray(i2t[images, n], dtype=np.int64)
    image_negative = np.asarray(t2i[caption_ids, n // captions_per_image], dtype=np.int64)
    offset = rng.integers(0, captions_per_image, size=len(caption_ids))
    draw = OfflineDraw(
        caption_negative=caption_negative,
        image_negative=image_negative,
        image_of_caption_negative=caption_negative // captions_per_image,
        caption_of_image_negative=image_negative * captions_per_image + offset,
    )
    # A positive sampled as a negative would teach the model to push a true pair apart;
    # only a corrupt or mismatched table can cause it, so fail loudly. A real check, not
    # an assert: ``python -O`` strips asserts.
    _refuse_positive(draw.image_of_caption_negative, images, caption_ids,
                     "offline caption negative belongs to the anchor image: corrupt i2t table")
    _refuse_positive(image_negative, images, caption_ids,
                     "offline image negative is the anchor caption's image: corrupt t2i table")
    return draw


class CorruptTableError(DataError, AssertionError):
    """A candidate table handed back a positive as a negative.

    Also an ``AssertionError``, which is what this check raised before it stopped being
    an ``assert``, so callers that caught that keep working.
    """


def _refuse_positive(drawn_image: np.ndarray, anchor_image: np.ndarray,
                     caption_ids: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(drawn_image == anchor_image)
    if bad.size:
        raise CorruptTableError(f"{what} (anchor caption {int(caption_ids[bad[0]])}, "
                                f"{bad.size} of {len(caption_ids)} anchors)")


def sampling_rng(seed: int, epoch: int, rank: int, step: int) -> np.random.Generator:
    """The generator for one batch: a pure function of where the batch is in training,
    so a resumed run (or a loader subprocess) draws exactly what the original did."""
    return np.random.default_rng([_DOMAIN, seed, epoch, rank, step])


def epoch_sampling_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator for one epoch's draws of *every* caption of the split, in caption
    order: with it, the draw of pair j is a function of (seed, epoch, j) alone, whichever
    rank, step or loader process asks for it."""
    return np.random.default_rng([_DOMAIN, seed, epoch])
