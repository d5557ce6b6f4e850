"""Captions tokenized once and cached as a memory-mapped Arrow file.

Tokenizing COCO's 566k training captions takes tens of seconds; every worker of every
run would pay it again. Instead the driver writes ``list<int32>`` token ids to an Arrow
IPC file keyed by the caption file's content hash and the vocabulary's fingerprint (so
a changed caption file or vocabulary rebuilds it), and workers memory-map it: the ids
are shared through the page cache, not copied per worker.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from aoq.atomic import atomic_write
from aoq.data.errors import DataError
from aoq.data.text import Vocabulary, tokenize

CACHE_SUFFIX = ".arrow"


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, first 16 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def writable_dir(preferred: Path, fallback: Path) -> Path:
    """``preferred`` if we may create files there (beside the data), else ``fallback``."""
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        probe = preferred / f".aoq-write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return preferred
    except OSError:
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


@dataclass(frozen=True)
class TokenizedCaptions:
    """Token ids of every caption of a split, as flat arrays.

    Attributes:
        offsets: (n_captions + 1,) int64; caption j's ids are ``values[offsets[j]:offsets[j+1]]``.
        values: (total_tokens,) int32 ids, each caption framed by ``<start>``/``<end>``.
    """

    offsets: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(n_captions,) int64 token counts including ``<start>`` and ``<end>``."""
        return np.diff(self.offsets)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad the captions at ``indices``: (B, L_max) int64 ids (0 = pad), (B,) lengths."""
        indices = np.asarray(indices, dtype=np.int64)
        starts = self.offsets[indices]
        lengths = self.offsets[indices + 1] - starts
        width = int(lengths.max()) if len(indices) else 0
        # One vectorised gather: position p of row b reads values[start_b + p] where p < len_b.
        pos = np.arange(width, dtype=np.int64)[None, :]
        valid = pos < lengths[:, None]
        flat = np.where(valid, starts[:, None] + pos, 0)
        tokens = np.where(valid, self.values[flat], 0).astype(np.int64)
        return torch.from_numpy(tokens), torch.from_numpy(lengths.astype(np.int64))


def encode_captions(
    captions: Sequence[str], vocab: Vocabulary, token_lists: Sequence[Sequence[str]] | None = None
) -> TokenizedCaptions:
    """Tokenize (unless ``token_lists`` are given) and map to ids."""
    if token_lists is None:
        token_lists = [tokenize(c) for c in captions]
    encoded = [vocab.encode(t) for t in token_lists]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    values = np.fromiter((i for e in encoded for i in e), dtype=np.int32, count=int(offsets[-1]))
    return TokenizedCaptions(offsets=offsets, values=values)


def cache_name(split: str, captions_key: str, vocab_key: str) -> str:
    return f"{split}_caps.tokens.{captions_key}.{vocab_key}{CACHE_SUFFIX}"


def write_cache(path: Path, tokens: TokenizedCaptions) -> None:
    """Write ids as one ``list<int32>`` column, atomically."""
    array = pa.LargeListArray.from_arrays(pa.array(tokens.offsets), pa.array(tokens.values))
    table = pa.table({"tokens": array})

    def write(fh) -> None:
        with pa.ipc.new_file(fh, table.schema) as writer:
            writer.write_table(table)

    atomic_write(path, write)


def read_cache(path: str | os.PathLike) -> TokenizedCaptions:
    """Memory-map a cache written by :func:`write_cache` (zero-copy views)."""
    try:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(source).read_all()
        column = table.column("tokens").combine_chunks()
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise DataError(f"unreadable caption cache ({exc})", path=path) from None
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy()
    return TokenizedCaptions(offsets=offsets, values=values)


def cached_tokens(
    cache_dir: Path,
    split: str,
    captions_file: Path,
    captions: Sequence[str],
    vocab: Vocabulary,
    token_lists: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Path of an up-to-date token cache for ``captions_file``, building it if needed.

    Stale caches of the same split (other caption or vocab keys) are removed.
    """
    key = cache_name(split, file_digest(captions_file), vocab.fingerprint())
    path = cache_dir / key
    if path.exists():
        return path
    write_cache(path, encode_captions(captions, vocab, token_lists))
    for stale in cache_dir.glob(f"{split}_caps.tokens.*{CACHE_SUFFIX}"):
        if stale.name != key:
            stale.unlink(missing_ok=True)
    return path
