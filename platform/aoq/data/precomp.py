"""Strict reader and atomic writer for the "precomp" data layout.

A split ``<split>`` of a data directory is two files:

- ``<dir>/<split>_ims.npy``: region features, float32 (or float16) of shape
  ``(n_images, n_regions, feature_dim)``, e.g. ``(113287, 36, 2048)`` for COCO train
  (33 GB, so it is only ever memory-mapped, never read whole);
- ``<dir>/<split>_caps.txt``: UTF-8 text, one caption per line, ``captions_per_image``
  consecutive lines per image, so caption ``j`` belongs to image ``j // captions_per_image``.

The public loaders of this layout fail silently (a missing caption shifts every later
image-caption pair; blank lines become captions; NaN features train to NaN; undecodable
bytes become ``b'...'`` tokens). :func:`read_precomp` refuses all of these with a
:class:`~aoq.data.errors.DataError` naming the file, and the line for captions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from aoq.atomic import atomic_write
from aoq.data.errors import DataError

__all__ = [
    "FEATURE_DTYPES",
    "PrecompSplit",
    "captions_path",
    "images_path",
    "iter_caption_lines",
    "read_precomp",
    "write_captions",
    "write_precomp",
]

#: Largest region count and feature size accepted: a batch holds batch x regions x dim
#: floats, so these bound a worker's memory (bottom-up features: 36 x 2048).
MAX_REGIONS = 1024
MAX_FEATURE_DIM = 16384

#: The feature dtypes accepted on disk (native byte order).
FEATURE_DTYPES: tuple[np.dtype[Any], ...] = (np.dtype(np.float32), np.dtype(np.float16))

# Upper bound on the bytes of features looked at per step of the finiteness check, so
# checking a 33 GB memmap needs ~64 MB (+ a quarter of that for the bool mask) of RAM.
_FINITE_CHUNK_BYTES = 64 * 1024 * 1024

#: The longest caption line accepted by default, in bytes (COCO's longest is a few
#: hundred); the config option ``data.max_caption_bytes`` has the same default. A line
#: is never read further than this, so one huge line cannot exhaust memory.
MAX_CAPTION_BYTES = 4096

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_UTF8_BOM = "\ufeff"


def images_path(directory: str | os.PathLike[str], split: str) -> Path:
    """Path of the feature file of ``split``: ``<directory>/<split>_ims.npy``."""
    return Path(directory) / f"{split}_ims.npy"


def captions_path(directory: str | os.PathLike[str], split: str) -> Path:
    """Path of the caption file of ``split``: ``<directory>/<split>_caps.txt``."""
    return Path(directory) / f"{split}_caps.txt"


@dataclass(frozen=True, eq=False, repr=False)
class PrecompSplit:
    """One validated split in the precomp layout.

    Attributes:
        directory: the data directory.
        split: the split name (``train``, ``dev``, ``test``, ``testall``, ...).
        images: read-only ``np.memmap`` of shape ``(n_images, n_regions, feature_dim)``,
            dtype float32 or float16. Index it (``images[i]``, ``images[idx]``) to read
            rows; ``np.asarray(images)`` on a large split reads the whole file.
        captions: ``n_images * captions_per_image`` captions, line terminators removed
            and otherwise untouched; captions of image ``i`` are
            ``captions[i * captions_per_image:(i + 1) * captions_per_image]``.
        captions_per_image: captions per image (5 for COCO and Flickr30K).
    """

    directory: Path
    split: str
    images: np.ndarray
    captions: list[str]
    captions_per_image: int

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def n_regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.images.shape[2])

    @property
    def images_path(self) -> Path:
        return images_path(self.directory, self.split)

    @property
    def captions_path(self) -> Path:
        return captions_path(self.directory, self.split)

    def image_of_caption(self, caption_index: int) -> int:
        """Index of the image that caption ``caption_index`` describes."""
        return caption_index // self.captions_per_image

    # The default dataclass repr would print every caption (566k of them for COCO train).
    def __repr__(self) -> str:
        return (
            f"PrecompSplit(directory={str(self.directory)!r}, split={self.split!r}, "
            f"images={self.images.dtype}{tuple(self.images.shape)}, "
            f"n_captions={self.n_captions}, captions_per_image={self.captions_per_image})"
        )


# --------------------------------------------------------------------------- reading


def read_precomp(
    directory: str | os.PathLike[str],
    split: str,
    *,
    captions_per_image: int = 5,
    check_finite: bool = True,
    progress: bool = False,
    max_caption_bytes: int = MAX_CAPTION_BYTES,
) -> PrecompSplit:
    """Open and validate one split of a precomp directory.

    The features are memory-mapped read-only (``np.load(..., mmap_mode="r")``), never
    read whole; the finiteness check streams through them in chunks of about 64 MB.

    Args:
        directory: the data directory holding ``<split>_ims.npy`` and ``<split>_caps.txt``.
        split: split name, e.g. ``"train"``, ``"dev"``, ``"test"``, ``"testall"``.
        captions_per_image: consecutive caption lines per image.
        check_finite: scan every feature for NaN/Inf (one sequential pass over the file).
            Turn off only for a file already checked, e.g. on a re-open.
        progress: show a tqdm bar during the finiteness scan.
        max_caption_bytes: the longest caption line accepted (UTF-8 bytes, without the
            line ending). Only ``captions_per_image * n_images`` captions are kept in
            memory; extra lines are counted, not stored.

    Returns:
        A :class:`PrecompSplit` whose ``images`` is a read-only memmap of shape
        ``(n_images, n_regions, feature_dim)`` and whose ``captions`` has exactly
        ``captions_per_image * n_images`` entries.

    Raises:
        DataError: a file is missing, unreadable, malformed, not UTF-8, has a blank
            caption, non-finite features, or the counts disagree. The message names the
            file (and the 1-based line for caption errors).
        DataError: an invalid ``split`` name; ValueError: invalid ``captions_per_image``.
    """
    _check_split_name(split)
    _check_captions_per_image(captions_per_image)
    directory = Path(directory)
    if not directory.exists():
        raise DataError("data directory does not exist", path=directory)
    if not directory.is_dir():
        raise DataError("data directory is not a directory", path=directory)

    ims_path = images_path(directory, split)
    caps_path = captions_path(directory, split)
    # Report both missing files before touching either, so one run shows the whole problem.
    missing = [p for p in (ims_path, caps_path) if not p.is_file()]
    if missing:
        found = _splits_in(directory)
        hint = f"; splits present in {directory}: {', '.join(found)}" if found else ""
        what = " and ".join(str(p) for p in missing)
        raise DataError(
            f"split {split!r} needs {ims_path.name} and {caps_path.name}; "
            f"missing: {what}{hint}",
            path=missing[0],
        )

    images = _open_features(ims_path)
    n_images = int(images.shape[0])
    expected = captions_per_image * n_images
    captions: list[str] = []
    extra = 0
    for _, text in iter_caption_lines(caps_path, max_bytes=max_caption_bytes):
        if len(captions) < expected:
            captions.append(text)
        else:
            extra += 1
    n_lines = len(captions) + extra
    if n_lines != expected:
        diff = n_lines - expected
        if diff > 0:
            wrong = f"{diff} caption line{'s' if diff != 1 else ''} too many"
        else:
            wrong = f"{-diff} caption line{'s' if diff != -1 else ''} missing"
        fits = ""
        if n_lines % captions_per_image == 0:
            fits = f" (the captions would fit {n_lines // captions_per_image} images)"
        raise DataError(
            f"{n_lines} captions for {n_images} images in {ims_path}: expected "
            f"{expected} ({captions_per_image} per image), {wrong}{fits}; a wrong count "
            "would shift every later image-caption pair, so the split is refused",
            path=caps_path,
        )

    if check_finite:
        _check_finite(images, ims_path, progress=progress)

    return PrecompSplit(
        directory=directory,
        split=split,
        images=images,
        captions=captions,
        captions_per_image=captions_per_image,
    )


def iter_caption_lines(path: str | os.PathLike[str], *, max_bytes: int = MAX_CAPTION_BYTES
                       ) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, caption)`` for every line of a caption file, strictly.

    Lines are split on ``\\n`` only and decoded one by one as UTF-8; a trailing ``\\r\\n``
    or ``\\n`` is removed and nothing else (no whitespace stripping). A final line without
    a newline is a caption; the empty string after a final newline is not. A UTF-8 byte
    order mark at the start of the file is dropped.

    Line numbers are 1-based. Shared by :func:`read_precomp` and any other reader of
    caption text (e.g. a vocabulary builder) so they agree on what a caption is.

    Args:
        max_bytes: the longest line accepted, without its line ending; a line is never
            read further than that.

    Raises:
        DataError: the file is missing or unreadable, a line is longer than
            ``max_bytes``, is not valid UTF-8, is blank (empty or whitespace only), or
            holds a carriage return before its end (a sign of old Mac ``\\r`` line
            endings, which would merge captions).
    """
    path = Path(path)
    try:
        fh: IO[bytes] = open(path, "rb")
    except FileNotFoundError:
        raise DataError("caption file does not exist", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot open caption file: {exc.strerror or exc}", path=path) from None
    limit = max_bytes + 2  # room for a CRLF ending
    with fh:
        line_no = 0
        while True:
            try:
                raw = fh.readline(limit)
            except OSError as exc:
                raise DataError(
                    f"read failed: {exc.strerror or exc}", path=path, line=line_no + 1
                ) from None
            if not raw:
                return
            line_no += 1
            whole = raw.endswith(b"\n") or len(raw) < limit
            if raw.endswith(b"\r\n"):
                raw = raw[:-2]
            elif raw.endswith(b"\n"):
                raw = raw[:-1]
            if not whole or len(raw) > max_bytes:
                raise DataError(
                    f"caption line longer than {max_bytes} bytes (the limit, "
                    "data.max_caption_bytes)", path=path, line=line_no)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.start + 1]
                raise DataError(
                    f"not valid UTF-8: byte 0x{bad.hex()} at byte offset {exc.start} of the "
                    f"line ({exc.reason})",
                    path=path,
                    line=line_no,
                ) from None
            if line_no == 1 and text.startswith(_UTF8_BOM):
                text = text[len(_UTF8_BOM) :]
            if "\r" in text:
                raise DataError(
                    "carriage return (\\r) inside the line; only LF or CRLF line endings "
                    "are accepted (old Mac CR endings would merge captions)",
                    path=path,
                    line=line_no,
                )
            if not text.strip():
                raise DataError(
                    "blank caption (empty or whitespace only)" if text else "empty caption line",
                    path=path,
                    line=line_no,
                )
            yield line_no, text


def _open_features(path: Path) -> np.ndarray:
    """Memory-map ``path`` read-only after checking its header; shape ``(n, regions, dim)``."""
    # Fortran order is accepted (rows read strided); np.save never writes it for C arrays.
    shape, _fortran_order, dtype, data_offset = _read_npy_header(path)
    if dtype.hasobject:
        raise DataError(
            f"holds an object (pickled Python objects) array of dtype {dtype}; features "
            "must be a numeric float32 or float16 array",
            path=path,
        )
    _check_feature_layout(path, shape, dtype)
    needed = data_offset + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size < needed:
        raise DataError(
            f"truncated .npy file: header declares shape {shape} {dtype}, which needs "
            f"{needed} bytes, but the file has only {size} bytes",
            path=path,
        )

    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"cannot memory-map .npy file: {exc}", path=path) from None
    if not isinstance(images, np.ndarray):
        # np.load hands back an NpzFile for zip archives; the magic check makes this
        # unreachable, but never leak its open handle or return a non-array.
        close = getattr(images, "close", None)
        if close is not None:
            close()
        raise DataError(f"is not a single .npy array ({type(images).__name__})", path=path)
    # The header said one thing; make sure what numpy mapped agrees.
    _check_feature_layout(path, images.shape, images.dtype)
    return images


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Parse the .npy header: ``(shape, fortran_order, dtype, data_offset)``."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot open features file: {exc.strerror or exc}", path=path) from None
    with fh:
        head = fh.read(len(_NPY_MAGIC))
        if head != _NPY_MAGIC:
            if not head:
                raise DataError("features file is empty, not a .npy array", path=path)
            if head.startswith(_ZIP_MAGIC):
                raise DataError(
                    "is a zip archive (.npz?), not a .npy array; save features with np.save",
                    path=path,
                )
            raise DataError(
                f"not a .npy file: starts with {head!r} instead of the .npy magic "
                f"{_NPY_MAGIC!r}",
                path=path,
            )
        fh.seek(0)
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                # 2.0 and 3.0 share the layout (3.0 only allows utf-8 in field names).
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fh)
        # Header parsing goes through ast/tokenize on untrusted bytes and can raise
        # ValueError, SyntaxError, tokenize.TokenError, EOFError...: all mean "corrupt".
        except Exception as exc:
            raise DataError(f"corrupt .npy header: {exc}", path=path) from None
        return tuple(int(d) for d in shape), bool(fortran_order), np.dtype(dtype), fh.tell()


def _check_feature_layout(path: Path, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    if len(shape) != 3:
        raise DataError(
            f"features must be 3-D (n_images, n_regions, feature_dim), got {len(shape)}-D "
            f"shape {shape}",
            path=path,
        )
    if dtype not in FEATURE_DTYPES:
        raise DataError(
            f"features must be float32 or float16 (native byte order), got dtype {dtype} "
            f"({dtype.str}) with shape {shape}",
            path=path,
        )
    if shape[0] == 0:
        raise DataError(f"no images: features have shape {shape}", path=path)
    if shape[1] == 0 or shape[2] == 0:
        raise DataError(f"empty regions or feature dimension: shape {shape}", path=path)
    if shape[1] > MAX_REGIONS or shape[2] > MAX_FEATURE_DIM:
        raise DataError(f"{shape[1]} regions x {shape[2]} dimensions per image; at most "
                        f"{MAX_REGIONS} x {MAX_FEATURE_DIM} (a batch holds batch x regions x "
                        "dimensions floats)", path=path)


def _check_finite(images: np.ndarray, path: Path, *, progress: bool) -> None:
    """Raise on the first image whose features hold NaN or +-Inf; bounded memory."""
    n = int(images.shape[0])
    row_bytes = max(1, int(np.prod(images.shape[1:])) * images.dtype.itemsize)
    rows_per_chunk = max(1, _FINITE_CHUNK_BYTES // row_bytes)
    # One mask reused across chunks: np.isfinite would otherwise allocate per chunk.
    mask = np.empty((min(rows_per_chunk, n), *images.shape[1:]), dtype=bool)

    bar = None
    if progress:
        from tqdm.auto import tqdm  # imported lazily: only needed for interactive use

        bar = tqdm(total=n, unit="img", desc=f"checking {path.name}", leave=False)
    try:
        for start in range(0, n, rows_per_chunk):
            stop = min(start + rows_per_chunk, n)
            chunk_mask = mask[: stop - start]
            np.isfinite(images[start:stop], out=chunk_mask)
            if not chunk_mask.all():
                row_ok = chunk_mask.reshape(stop - start, -1).all(axis=1)
                bad = int(np.flatnonzero(~row_ok)[0])
                index = start + bad
                row = np.asarray(images[index])
                region, dim = (int(i) for i in np.argwhere(~np.isfinite(row))[0])
                value = row[region, dim]
                n_bad = int((~np.isfinite(row)).sum())
                raise DataError(
                    f"non-finite feature in image {index} (0-based row): {value} at "
                    f"region {region}, dim {dim} ({n_bad} non-finite values in that image)",
                    path=path,
                )
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()


def _splits_in(directory: Path) -> list[str]:
    try:
        names = {p.name[: -len("_ims.npy")] for p in directory.glob("*_ims.npy")}
        names |= {p.name[: -len("_caps.txt")] for p in directory.glob("*_caps.txt")}
    except OSError:
        return []
    return sorted(names)


def _check_split_name(split: str) -> None:
    if not isinstance(split, str) or not split:
        raise DataError(f"split must be a non-empty string, got {split!r}")
    if "/" in split or os.sep in split or (os.altsep and os.altsep in split) or \
            split in (".", ".."):
        raise DataError(f"split must be a bare name, not a path: {split!r}")


def _check_captions_per_image(captions_per_image: int) -> None:
    if (
        isinstance(captions_per_image, bool)
        or not isinstance(captions_per_image, int)
        or captions_per_image < 1
    ):
        raise ValueError(f"captions_per_image must be a positive int, got {captions_per_image!r}")


# --------------------------------------------------------------------------- writing


def write_precomp(
    directory: str | os.PathLike[str],
    split: str,
    images: np.ndarray,
    captions: Sequence[str],
    *,
    captions_per_image: int = 5,
) -> None:
    """Write one split in the precomp layout, each file atomically.

    Everything is validated before anything is written, to the same rules
    :func:`read_precomp` enforces, so a written split always reads back. Each file is
    written to a temporary file in ``directory``, fsynced, then ``os.replace``-d into
    place: a reader never sees a half-written file. The two files are not replaced as one
    unit; a crash between them leaves a split whose caption count check usually fails.

    Args:
        directory: created if missing.
        split: split name; files are ``<split>_ims.npy`` and ``<split>_caps.txt``.
        images: float32 or float16 array of shape ``(n_images, n_regions, feature_dim)``,
            all finite.
        captions: ``captions_per_image * n_images`` non-blank strings without ``\\n`` or
            ``\\r``; written UTF-8, one per LF-terminated line.
        captions_per_image: consecutive captions per image.

    Raises:
        DataError: invalid images or captions (naming the target file, and for a caption
            the line it would have had).
        DataError / ValueError: an invalid ``split`` / ``captions_per_image``.
    """
    _check_split_name(split)
    _check_captions_per_image(captions_per_image)
    directory = Path(directory)
    ims_path = images_path(directory, split)
    caps_path = captions_path(directory, split)

    if not isinstance(images, np.ndarray):
        raise DataError(f"images must be a numpy array, got {type(images).__name__}", path=ims_path)
    _check_feature_layout(ims_path, tuple(images.shape), images.dtype)
    _check_finite(images, ims_path, progress=False)

    _check_captions(caps_path, captions, int(images.shape[0]), captions_per_image)

    directory.mkdir(parents=True, exist_ok=True)
    contiguous = np.ascontiguousarray(images)

    def write_images(fh: IO[bytes]) -> None:
        np.lib.format.write_array(fh, contiguous, allow_pickle=False)

    atomic_write(ims_path, write_images)
    _write_captions_file(caps_path, captions)


def _check_captions(caps_path: Path, captions: Sequence[str], n_images: int,
                    captions_per_image: int) -> None:
    """The caption rules :func:`read_precomp` enforces, checked before writing."""
    if isinstance(captions, (str, bytes)):
        raise DataError("captions must be a sequence of strings, not one string", path=caps_path)
    expected = captions_per_image * n_images
    if len(captions) != expected:
        raise DataError(
            f"{len(captions)} captions for {n_images} images: expected {expected} "
            f"({captions_per_image} per image)",
            path=caps_path,
        )
    for i, caption in enumerate(captions):
        line = i + 1
        if not isinstance(caption, str):
            raise DataError(
                f"caption {i} is {type(caption).__name__}, not str", path=caps_path, line=line
            )
        if "\n" in caption or "\r" in caption:
            raise DataError(
                f"caption {i} contains a line break: {caption!r}", path=caps_path, line=line
            )
        if not caption.strip():
            raise DataError(f"caption {i} is blank: {caption!r}", path=caps_path, line=line)
        if i == 0 and caption.startswith(_UTF8_BOM):
            # The reader drops a leading BOM, so this caption would not read back as given.
            raise DataError("caption 0 starts with a byte order mark", path=caps_path, line=line)


def _write_captions_file(caps_path: Path, captions: Sequence[str]) -> None:
    def write(fh: IO[bytes]) -> None:
        for caption in captions:
            fh.write(caption.encode("utf-8"))
            fh.write(b"\n")

    atomic_write(caps_path, write)


def write_captions(directory: str | os.PathLike[str], split: str, captions: Sequence[str],
                   n_images: int, *, captions_per_image: int = 5) -> None:
    """Write only ``<split>_caps.txt`` (atomically, checked as :func:`write_precomp` does),
    for a writer that streamed the features into ``<split>_ims.npy`` itself (the
    ``scenes`` generator at COCO scale, whose 33 GB of features never fit in memory)."""
    _check_split_name(split)
    _check_captions_per_image(captions_per_image)
    Path(directory).mkdir(parents=True, exist_ok=True)
    caps_path = captions_path(directory, split)
    _check_captions(caps_path, captions, n_images, captions_per_image)
    _write_captions_file(caps_path, captions)
