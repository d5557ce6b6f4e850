"""Mining once from a first-round model checkpoint (the paper's procedure)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from aoq.data.errors import DataError
from aoq.data.prepare import DataSignature, SplitArrays
from aoq.models.files import load_model_for
from aoq.negatives.filters import score_margin_of
from aoq.negatives.from_model import mine_from_model


def mine_from_checkpoint(
    path: str | os.PathLike,
    split: SplitArrays,
    neg_cfg: Any,
    *,
    vocab_size: int,
    vocab_fingerprint: str = "",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Tables of ``split`` under the model stored at ``path`` (a ``best_model.pt``).

    Args:
        neg_cfg: the ``negatives`` config section (K's, block size, score filter).
        vocab_size, vocab_fingerprint: the data's vocabulary
            (``PreparedData.vocab_size`` / ``.vocab_fingerprint``); the checkpoint must
            have been trained with it (:func:`aoq.models.files.check_fits_data`).

    Returns:
        (i2t, t2i, metadata for the table version).

    Raises:
        CheckpointError: not a model file, or one for other data.
        DataError: a cross-attention model, which cannot mine.
    """
    _, n_regions, feature_dim = split.images.shape
    model, record = load_model_for(path, DataSignature(vocab_size, vocab_fingerprint,
                                                       n_regions, feature_dim))
    if not model.has_global_embedding:
        raise DataError(
            f"a {record['model_config'].get('name')!r} model scores pairs by cross attention "
            "and cannot mine the whole training set; use a vse, vse_gpo or vsrn checkpoint "
            "as the mining model", path=path)
    start = time.perf_counter()
    i2t, t2i = mine_from_model(model, split, k_captions=neg_cfg.k_captions,
                               k_images=neg_cfg.k_images, block_rows=neg_cfg.block_rows,
                               progress=progress, score_margin=score_margin_of(neg_cfg))
    meta = {"source": f"checkpoint:{os.fspath(path)}", "epoch": record.get("epoch"),
            "seconds": round(time.perf_counter() - start, 3)}
    return i2t, t2i, meta
