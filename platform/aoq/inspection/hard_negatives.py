"""The offline hard negatives a run trained with, and how the model scores them.

A run's candidate tables live in versions (``aoq.negatives.tables``); rank 0 records the
version it trained each epoch with in ``negatives/used_rank0.jsonl``. The version *in
use* is the one of the last epoch recorded there, looked up where the run's
``negatives.source`` keeps its tables (the run's own ``negatives/`` for ``mine`` and
``checkpoint:``, the given directory for ``tables:``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aoq.config import Config, parse_negative_source
from aoq.data.prepare import SplitArrays
from aoq.models.base import RetrievalModel
from aoq.models.encode import eval_mode
from aoq.negatives.tables import CandidateTables, list_versions, load_tables, version_dir
from aoq.training.run_files import tables_root, used_versions_file


@dataclass(frozen=True)
class TablesInUse:
    """A table version and why it is the one shown."""

    tables: CandidateTables
    why: str


def last_used_version(run_dir: str | os.PathLike) -> int | None:
    """The table version rank 0 trained its last recorded epoch with (0: none), or None
    when the run has no record."""
    path = used_versions_file(run_dir, 0)
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return int(json.loads(lines[-1])["version"]) if lines else None


def tables_in_use(cfg: Config, run_dir: str | os.PathLike, *, n_images: int,
                  captions_per_image: int) -> TablesInUse | None:
    """The tables a run trained with last (see the module docstring), or None when it
    trained without any (``triplet``)."""
    kind, path = parse_negative_source(cfg.negatives.source)
    root = Path(path) if kind == "tables" else tables_root(run_dir)
    used = last_used_version(run_dir)
    if used == 0:
        return None
    if (root / "meta.json").is_file():  # tables:<a version directory>
        where, why = root, f"negatives.source={cfg.negatives.source}"
    elif used is not None:
        where, why = version_dir(root, used), "the version its last epoch trained with"
    elif list_versions(root):
        where, why = root, "the latest version (the run recorded none in use)"
    else:
        return None
    tables = load_tables(where, n_images=n_images, captions_per_image=captions_per_image)
    return TablesInUse(tables, why)


def encode_images_at(model: RetrievalModel, split: SplitArrays, ids: np.ndarray
                     ) -> torch.Tensor:
    """(len(ids), ...) encodings of the split's images ``ids``."""
    with eval_mode(model):
        return model.encode_images(torch.from_numpy(
            np.array(split.images[np.asarray(ids)], dtype=np.float32)))


def encode_captions_at(model: RetrievalModel, split: SplitArrays, ids: np.ndarray
                       ) -> torch.Tensor:
    """(len(ids), ...) encodings of the split's captions ``ids``."""
    tokens, lengths = split.tokens.batch(np.asarray(ids))
    with eval_mode(model):
        return model.encode_captions(tokens, lengths)


@dataclass(frozen=True)
class AnchorNegatives:
    """One training pair and its offline hard negatives, scored by the model.

    Attributes:
        image, caption: the anchor pair (indices of the training split).
        positive: S(image, caption).
        caption_negatives: (caption id, S(image, that caption)) from ``i2t[image]``.
        image_negatives: (image id, S(that image, caption)) from ``t2i[caption]``.
    """

    image: int
    caption: int
    positive: float
    caption_negatives: list[tuple[int, float]]
    image_negatives: list[tuple[int, float]]


def score_anchor(model: RetrievalModel, split: SplitArrays, tables: CandidateTables,
                 image: int, caption: int, top: int) -> AnchorNegatives:
    """The first ``top`` candidates of each table for the anchor (image, caption)."""
    neg_caps = np.asarray(tables.i2t[image, :top], dtype=np.int64)
    neg_imgs = np.asarray(tables.t2i[caption, :top], dtype=np.int64)
    with eval_mode(model):
        anchor_i = encode_images_at(model, split, np.array([image]))
        anchor_c = encode_captions_at(model, split, np.array([caption]))
        positive = float(model.similarity(anchor_i, anchor_c)[0, 0])
        cap_scores = model.similarity(anchor_i, encode_captions_at(model, split, neg_caps))[0]
        img_scores = model.similarity(encode_images_at(model, split, neg_imgs), anchor_c)[:, 0]
    return AnchorNegatives(
        image, caption, positive,
        [(int(c), float(s)) for c, s in zip(neg_caps, cap_scores)],
        [(int(i), float(s)) for i, s in zip(neg_imgs, img_scores)])
