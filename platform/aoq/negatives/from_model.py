"""Mine candidate tables from a model: embed the training split, then exact top-K."""

from __future__ import annotations

import numpy as np

from aoq.data.prepare import SplitArrays
from aoq.models.encode import encode_split
from aoq.models.base import RetrievalModel
from aoq.negatives.mining import mine_candidates


def mine_from_model(
    model: RetrievalModel,
    split: SplitArrays,
    *,
    k_captions: int,
    k_images: int,
    block_rows: int = 2048,
    progress: bool = False,
    score_margin: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact i2t (n_images, k_captions) and t2i (n_captions, k_images) tables of ``split``
    under ``model``'s current weights (score-filtered when ``score_margin`` is given:
    :mod:`aoq.negatives.filters`).

    Only global-embedding models can mine this way; cross-attention models take their
    negatives from a global "mining model" (as the authors used VSRN for BFAN).
    """
    if not model.has_global_embedding:
        raise ValueError(f"{type(model).__name__} has no global embedding; mine with a vse, "
                         "vse_gpo or vsrn checkpoint instead "
                         "(negatives.source=checkpoint:<path>)")
    images, captions = encode_split(model, split, progress=progress)
    return mine_candidates(
        images, captions, k_captions, k_images, split.captions_per_image,
        block_rows=block_rows, progress=progress, score_margin=score_margin,
    )
