"""Pictures of a split's images, for people to look at (galleries, the served page).

A model only ever sees region features; a person wants the picture. Where a dataset
keeps them:

* rendered image files, ``<dataset>/<split>_images/<index:05d>.png`` (index = row of
  ``<split>_ims.npy``), as the ``emoji`` builder writes them: used as they are;
* scene records, ``<dataset>/<split>_scenes.jsonl`` (one JSON object per image), as the
  ``scenes`` generator writes them: each picture is drawn from its record
  (:mod:`aoq.data.scene_pictures`);
* neither (COCO, Flickr30K precomp features): no picture; callers show the index.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from aoq.data.errors import DataError
from aoq.data.scene_pictures import scene_png


def picture_dir(directory: str | os.PathLike, split: str) -> Path:
    """Where a dataset keeps the rendered image files of ``split``."""
    return Path(directory) / f"{split}_images"


def picture_file(directory: str | os.PathLike, split: str, index: int) -> Path:
    """The rendered image file of image ``index`` of ``split``."""
    return picture_dir(directory, split) / f"{index:05d}.png"


def scene_records_path(directory: str | os.PathLike, split: str) -> Path:
    """Where the ``scenes`` generator records what each image of ``split`` shows."""
    return Path(directory) / f"{split}_scenes.jsonl"


def read_scene_records(path: str | os.PathLike, n_images: int) -> list[dict[str, Any]]:
    """The records of a ``<split>_scenes.jsonl`` file, one per image.

    Raises:
        DataError: naming the file (and line) when a line is not a JSON object or the
            count differs from ``n_images``.
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"not a JSON scene record ({exc.msg})", path=path,
                                    line=line_no) from None
                if not isinstance(record, dict):
                    raise DataError("a scene record must be a JSON object", path=path,
                                    line=line_no)
                records.append(record)
    except OSError as exc:
        raise DataError(f"cannot read scene records: {exc.strerror or exc}", path=path) from None
    if len(records) != n_images:
        raise DataError(f"{len(records)} scene records for {n_images} images", path=path)
    return records


class SplitPictures:
    """The pictures of one split, wherever its dataset keeps them (module docstring).

    Args:
        directory: the dataset directory (precomp layout).
        split: the split name.
        n_images: its number of images (indices are checked against it).
    """

    def __init__(self, directory: str | os.PathLike, split: str, n_images: int) -> None:
        self.directory, self.split, self.n_images = Path(directory), split, n_images
        if picture_dir(directory, split).is_dir():
            self.kind = "files"
        elif scene_records_path(directory, split).is_file():
            self.kind = "scenes"
        else:
            self.kind = "none"

    @cached_property
    def _records(self) -> list[dict[str, Any]]:
        return read_scene_records(scene_records_path(self.directory, self.split),
                                  self.n_images)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.n_images:
            raise IndexError(f"image {index} is out of range: {self.split} has images "
                             f"0..{self.n_images - 1}")

    def png(self, index: int) -> bytes | None:
        """PNG bytes of image ``index``, or None where the dataset has no picture of it."""
        self._check(index)
        if self.kind == "files":
            path = picture_file(self.directory, self.split, index)
            return path.read_bytes() if path.is_file() else None
        if self.kind == "scenes":
            return scene_png(self._records[index])
        return None

    def describe(self, index: int) -> str:
        """A short text of what image ``index`` shows (alt text), or its index."""
        self._check(index)
        if self.kind != "scenes":
            return f"{self.split} image {index}"
        record = self._records[index]
        things = " and ".join(f"{o.get('size', '')} {o.get('colour', '')} {o.get('object', '')}"
                              .strip() for o in record.get("objects", []))
        return f"{things} ({record.get('background', '?')})"
