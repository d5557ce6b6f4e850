"""A trained model and one split's encodings, ready to answer queries.

Encoding a split is the slow part of a query (seconds to minutes); scoring one query
against the encodings is fast. So the encodings are cached on disk under
``<data.cache_dir>/index/<key>/``, keyed by the checkpoint file (path, size, mtime) and
the split (features file, token cache, which names the captions and the vocabulary):
the second query of a checkpoint and split only reads them back.

The split is encoded on the same fixed batch grid as evaluation
(:func:`aoq.models.encode.encode_range`), so every encoding is bit-identical to the one
``jobs/evaluate.py`` scores with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aoq.atomic import atomic_write, atomic_write_text
from aoq.data.errors import DataError
from aoq.data.prepare import PreparedData, SplitArrays, open_split
from aoq.data.text import Vocabulary
from aoq.models.base import RetrievalModel
from aoq.models.encode import encode_captions_range, encode_images_range
from aoq.models.files import load_model_for

#: Bump when what is cached (or how it is encoded) changes.
INDEX_VERSION = 1
#: Images per encoding batch: the grid evaluation uses, so encodings match its own.
ENCODE_BATCH = 256
META_FILE = "meta.json"


@dataclass(frozen=True)
class SplitIndex:
    """A model with the encodings of every image and caption of one split.

    Attributes:
        model: the model, in eval mode.
        record: the checkpoint's model record without its weights.
        checkpoint: the checkpoint file.
        split_name: the split.
        split: the split's memory-mapped features and tokens.
        vocab: the vocabulary its captions were tokenized with.
        images: (n_images, ...) image encodings (one vector, or one per region).
        captions: (cpi * n_images, ...) caption encodings (one vector, or one per word).
    """

    model: RetrievalModel
    record: dict[str, Any]
    checkpoint: str
    split_name: str
    split: SplitArrays
    vocab: Vocabulary
    images: torch.Tensor
    captions: torch.Tensor

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.captions.shape[0])

    @property
    def captions_per_image(self) -> int:
        return self.split.captions_per_image

    @property
    def model_name(self) -> str:
        return str(self.record["model_config"].get("name", "?"))


def _stamp(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def index_key(checkpoint: str | os.PathLike, prepared: PreparedData, split: str) -> str:
    """The cache key of a checkpoint's encodings of ``split``."""
    features = Path(prepared.directory) / f"{split}_ims.npy"
    payload = {"version": INDEX_VERSION, "batch": ENCODE_BATCH,
               "checkpoint": _stamp(Path(checkpoint)), "features": _stamp(features),
               "tokens": prepared.splits[split].tokens_path}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _save_array(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.lib.format.write_array(fh, array, allow_pickle=False))


def _load_array(path: Path) -> torch.Tensor:
    # Copy-on-write mapping: pages are read on demand, and torch gets a writable array.
    return torch.from_numpy(np.load(path, mmap_mode="c", allow_pickle=False))


def open_index(checkpoint: str | os.PathLike, prepared: PreparedData, split: str,
               cache_dir: str | os.PathLike, *, progress: bool = False) -> SplitIndex:
    """The index of ``split`` under ``checkpoint``: cached encodings, or encode and cache.

    Args:
        prepared: the prepared data (``aoq.data.prepare_data``).
        cache_dir: ``data.cache_dir``; encodings go to ``<cache_dir>/index/<key>/``.
        progress: progress bars while encoding.

    Raises:
        DataError: an unknown split.
        CheckpointError: a missing or unreadable checkpoint, or one trained on other data.
    """
    if split not in prepared.splits:
        raise DataError(f"no split {split!r} here (prepared: {sorted(prepared.splits)}); "
                        "set data.test_split (or data.dev_split) to it", path=prepared.directory)
    model, record = load_model_for(checkpoint, prepared.signature)
    arrays = open_split(prepared, split)
    where = Path(cache_dir) / "index" / index_key(checkpoint, prepared, split)
    if (where / META_FILE).is_file():
        images, captions = _load_array(where / "images.npy"), _load_array(where / "captions.npy")
    else:
        images = encode_images_range(model, arrays, 0, arrays.n_images, batch_size=ENCODE_BATCH,
                                     progress="encoding images" if progress else None)
        captions = encode_captions_range(model, arrays, 0, arrays.n_images,
                                         batch_size=ENCODE_BATCH,
                                         progress="encoding captions" if progress else None)
        where.mkdir(parents=True, exist_ok=True)
        _save_array(where / "images.npy", images.cpu().numpy())
        _save_array(where / "captions.npy", captions.cpu().numpy())
        # Written last: its presence marks a complete entry.
        atomic_write_text(where / META_FILE, json.dumps(
            {"checkpoint": str(Path(checkpoint).resolve()), "split": split,
             "directory": prepared.directory, "model": record["model_config"].get("name")}))
    return SplitIndex(model=model, record=record, checkpoint=str(checkpoint), split_name=split,
                      split=arrays, vocab=Vocabulary.load(prepared.vocab_path),
                      images=images, captions=captions)
