"""Versioned candidate tables on disk: written atomically, read memory-mapped, checked.

Layout of one version (a directory, published by a single rename)::

    <root>/v0003/i2t.npy    int64 (n_images, k_captions), best candidate first
    <root>/v0003/t2i.npy    int32 (n_captions, k_images)
    <root>/v0003/meta.json  version, epoch, source checkpoint, K, sizes, time

Tables for COCO are 113k x 2000 x 8 B + 566k x 400 x 4 B ~ 2.7 GB, so they are read
with ``mmap_mode="r"`` and every worker shares the page cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aoq.atomic import atomic_write, atomic_write_text, fsync_directory
from aoq.data.errors import DataError

_VERSION_DIR = re.compile(r"^v(\d{4,})$")
#: A version's meta.json holds a few fields; anything far larger is not one.
MAX_META_BYTES = 1 << 20
#: Rows checked per step when validating ids (bounded memory on COCO-sized tables).
_CHECK_ROWS = 1 << 16


@dataclass(frozen=True)
class CandidateTables:
    """A loaded table version.

    Attributes:
        i2t: (n_images, k_captions) int64 caption ids per image, best first.
        t2i: (n_captions, k_images) int32 image ids per caption, best first.
        meta: the version's metadata (``version``, ``epoch``, ``source`` ...).
        path: the version directory, or None for tables that only live in memory.
    """

    i2t: np.ndarray
    t2i: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def version(self) -> int:
        return int(self.meta.get("version", 0))


def version_dir(root: str | os.PathLike, version: int) -> Path:
    return Path(root) / f"v{version:04d}"


def list_versions(root: str | os.PathLike) -> list[int]:
    """Published versions under ``root`` (those with a meta.json), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _VERSION_DIR.match(child.name)
        if m and (child / "meta.json").exists():
            out.append(int(m.group(1)))
    return sorted(out)


def save_tables(
    root: str | os.PathLike, version: int, i2t: np.ndarray, t2i: np.ndarray, **meta: Any
) -> Path:
    """Publish ``version`` under ``root`` atomically and return its directory.

    Files go to a hidden sibling directory that is renamed into place, so a reader sees
    either no version or a complete one. Extra keyword arguments go into meta.json.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = version_dir(root, version)
    if final.exists():
        raise FileExistsError(f"{final}: table version {version} already exists")
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        for name, array, dtype in (("i2t", i2t, np.int64), ("t2i", t2i, np.int32)):
            data = np.ascontiguousarray(array, dtype=dtype)
            atomic_write(tmp / f"{name}.npy",
                         lambda fh, a=data: np.lib.format.write_array(fh, a, allow_pickle=False))
        full_meta = {
            "version": version,
            "n_images": int(i2t.shape[0]),
            "n_captions": int(t2i.shape[0]),
            "k_captions": int(i2t.shape[1]),
            "k_images": int(t2i.shape[1]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **meta,
        }
        atomic_write_text(tmp / "meta.json", json.dumps(full_meta, indent=2, default=str))
        os.rename(tmp, final)
        fsync_directory(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _load_ids(path: Path, name: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"missing {name} table", path=path) from None
    except (ValueError, OSError) as exc:
        raise DataError(f"unreadable {name} table ({exc})", path=path) from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} table must be a 2-D integer array, got {array.dtype} "
                        f"{array.shape}", path=path)
    return array


def _check_range(array: np.ndarray, upper: int, path: Path, name: str) -> None:
    for start in range(0, array.shape[0], _CHECK_ROWS):
        block = np.asarray(array[start:start + _CHECK_ROWS])
        bad = (block < 0) | (block >= upper)
        if bad.any():
            row, col = (int(v) for v in np.argwhere(bad)[0])
            raise DataError(f"{name}[{start + row}, {col}] = {int(block[row, col])} is out of "
                            f"range 0..{upper - 1}", path=path)


def load_tables(
    path: str | os.PathLike,
    *,
    n_images: int | None = None,
    captions_per_image: int = 5,
    check_ids: bool = True,
) -> CandidateTables:
    """Memory-map a table version directory, checking shapes and (optionally) every id.

    Args:
        path: a version directory (``.../v0003``) or a root (its latest version is used).
        n_images: the training split's image count; when given, shapes and ids are checked
            against it so tables of other data are refused.

    Raises:
        DataError: naming the file and the offending row/column.
    """
    path = Path(path)
    if not (path / "meta.json").exists():
        versions = list_versions(path)
        if not versions:
            raise DataError("no candidate tables here (expected meta.json or v*/ "
                            "version directories)", path=path)
        path = version_dir(path, versions[-1])
    try:
        if (path / "meta.json").stat().st_size > MAX_META_BYTES:
            raise ValueError(f"over {MAX_META_BYTES} bytes")
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"unreadable table metadata ({exc})", path=path / "meta.json") from None
    i2t = _load_ids(path / "i2t.npy", "i2t")
    t2i = _load_ids(path / "t2i.npy", "t2i")
    if t2i.shape[0] != captions_per_image * i2t.shape[0]:
        raise DataError(f"t2i has {t2i.shape[0]} rows but i2t has {i2t.shape[0]}: expected "
                        f"{captions_per_image} caption rows per image", path=path / "t2i.npy")
    if n_images is not None and i2t.shape[0] != n_images:
        raise DataError(f"i2t has {i2t.shape[0]} rows but the training split has {n_images} "
                        "images: these tables belong to other data", path=path / "i2t.npy")
    if check_ids:
        _check_range(i2t, t2i.shape[0], path / "i2t.npy", "i2t")
        _check_range(t2i, i2t.shape[0], path / "t2i.npy", "t2i")
    return CandidateTables(i2t=i2t, t2i=t2i, meta=meta, path=str(path))
