"""Strict precomp reader/writer: real files under tmp_path, no mocks."""

from __future__ import annotations

import mmap
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from aoq.data import precomp as precomp_module
from aoq.data.errors import DataError
from aoq.data.precomp import PrecompSplit, iter_caption_lines, read_precomp, write_precomp

N_IMAGES = 4
N_REGIONS = 3
DIM = 8
CPI = 5


def _features(n: int = N_IMAGES, dtype: type = np.float32) -> np.ndarray:
    """Deterministic features of shape (n, N_REGIONS, DIM)."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, N_REGIONS, DIM)).astype(dtype)


def _captions(n_images: int = N_IMAGES) -> list[str]:
    # Double spaces, tabs and non-ASCII must survive the round trip untouched.
    return [f"caption {j} of image {j // CPI}  with\tünïcode" for j in range(n_images * CPI)]


def _write_caps_bytes(directory: Path, data: bytes, split: str = "train") -> Path:
    path = directory / f"{split}_caps.txt"
    path.write_bytes(data)
    return path


def _good_split(directory: Path, split: str = "train") -> tuple[np.ndarray, list[str]]:
    images, captions = _features(), _captions()
    write_precomp(directory, split, images, captions)
    return images, captions


def _caption_lines(n: int) -> list[bytes]:
    return [f"a caption number {j}".encode() for j in range(n)]


# ----------------------------------------------------------------------------- DataError


def test_data_error_is_value_error_and_formats_location(tmp_path: Path) -> None:
    err = DataError("bad thing", path=tmp_path / "x.txt", line=7)
    assert isinstance(err, ValueError)
    assert str(err) == f"{tmp_path / 'x.txt'}, line 7: bad thing"
    assert err.line == 7 and Path(err.path) == tmp_path / "x.txt" and err.message == "bad thing"
    assert str(DataError("m", path="f.npy")) == "f.npy: m"
    assert str(DataError("m")) == "m"
    with pytest.raises(ValueError):
        raise err


def test_data_error_pickles_with_location() -> None:
    err = pickle.loads(pickle.dumps(DataError("oops", path="a/b_caps.txt", line=3)))
    assert isinstance(err, DataError)
    assert (err.message, err.path, err.line) == ("oops", "a/b_caps.txt", 3)
    assert str(err) == "a/b_caps.txt, line 3: oops"


# ----------------------------------------------------------------------------- good splits


def test_round_trip_is_memory_mapped_and_read_only(tmp_path: Path) -> None:
    images, captions = _good_split(tmp_path)
    split = read_precomp(tmp_path, "train")

    assert isinstance(split, PrecompSplit)
    assert isinstance(split.images, np.memmap)
    assert isinstance(split.images.base, mmap.mmap) or isinstance(
        getattr(split.images, "_mmap", None), mmap.mmap
    )
    assert not split.images.flags.writeable
    with pytest.raises(ValueError):
        split.images[0, 0, 0] = 1.0
    np.testing.assert_array_equal(np.asarray(split.images), images)
    assert split.images.dtype == np.float32
    assert split.captions == captions
    assert (split.n_images, split.n_captions, split.n_regions, split.feature_dim) == (
        N_IMAGES,
        N_IMAGES * CPI,
        N_REGIONS,
        DIM,
    )
    assert split.captions_per_image == CPI
    assert split.images_path == tmp_path / "train_ims.npy"
    assert split.captions_path == tmp_path / "train_caps.txt"
    assert split.image_of_caption(7) == 1
    assert "train" in repr(split) and "caption 0" not in repr(split)
    # LF-terminated UTF-8, no temp files left behind.
    raw = split.captions_path.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw and raw.count(b"\n") == N_IMAGES * CPI
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_caps.txt", "train_ims.npy"]


def test_crlf_and_missing_final_newline_accepted(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", _features())
    lines = _caption_lines(N_IMAGES * CPI)
    _write_caps_bytes(tmp_path, b"\r\n".join(lines))  # CRLF, no terminator on the last line
    split = read_precomp(tmp_path, "train")
    assert split.captions == [line.decode() for line in lines]


def test_float16_accepted(tmp_path: Path) -> None:
    images = _features(dtype=np.float16)
    write_precomp(tmp_path, "dev", images, _captions())
    split = read_precomp(tmp_path, "dev")
    assert split.images.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(split.images), images)


def test_utf8_bom_dropped_and_whitespace_kept(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", _features(1))
    caps = ["  lead", "trail  ", "a b", "c", "d"]
    _write_caps_bytes(tmp_path, b"\xef\xbb\xbf" + "\n".join(caps).encode() + b"\n")
    assert read_precomp(tmp_path, "train").captions == caps


def test_captions_per_image_other_than_five(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", _features(3), ["x"] * 6, captions_per_image=2)
    split = read_precomp(tmp_path, "train", captions_per_image=2)
    assert split.n_captions == 6
    with pytest.raises(DataError, match="6 captions for 3 images"):
        read_precomp(tmp_path, "train")


def test_progress_bar_and_chunked_finite_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _features(10)
    write_precomp(tmp_path, "train", images, _captions(10))
    # One image per chunk: the scan must cross chunk boundaries and still find row 7.
    monkeypatch.setattr(precomp_module, "_FINITE_CHUNK_BYTES", 1)
    read_precomp(tmp_path, "train", progress=True)
    bad = images.copy()
    bad[7, 2, 5] = np.nan
    np.save(tmp_path / "train_ims.npy", bad)
    with pytest.raises(DataError, match=r"image 7 .*region 2, dim 5"):
        read_precomp(tmp_path, "train", progress=True)
    assert read_precomp(tmp_path, "train", check_finite=False).n_images == 10


# ----------------------------------------------------------------------------- bad features


def _assert_features_error(tmp_path: Path, *fragments: str) -> DataError:
    with pytest.raises(DataError) as info:
        read_precomp(tmp_path, "train")
    msg = str(info.value)
    assert "train_ims.npy" in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert info.value.line is None
    return info.value


def test_truncated_npy(tmp_path: Path) -> None:
    _good_split(tmp_path)
    path = tmp_path / "train_ims.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    _assert_features_error(tmp_path, "truncated")


def test_not_an_npy_file(tmp_path: Path) -> None:
    _good_split(tmp_path)
    (tmp_path / "train_ims.npy").write_bytes(b"hello, I am text\n" * 10)
    _assert_features_error(tmp_path, "not a .npy file")


def test_empty_npy_file(tmp_path: Path) -> None:
    _good_split(tmp_path)
    (tmp_path / "train_ims.npy").write_bytes(b"")
    _assert_features_error(tmp_path, "empty")


def test_corrupt_npy_header(tmp_path: Path) -> None:
    _good_split(tmp_path)
    path = tmp_path / "train_ims.npy"
    data = bytearray(path.read_bytes())
    data[10:20] = b"!!garbage!"
    path.write_bytes(bytes(data))
    _assert_features_error(tmp_path, "header")


def test_npz_archive(tmp_path: Path) -> None:
    _good_split(tmp_path)
    with open(tmp_path / "train_ims.npy", "wb") as fh:
        np.savez(fh, x=_features())
    _assert_features_error(tmp_path, "zip")


def test_pickled_object_array(tmp_path: Path) -> None:
    _good_split(tmp_path)
    objs = np.empty((N_IMAGES, N_REGIONS, DIM), dtype=object)
    objs[...] = 1.0
    np.save(tmp_path / "train_ims.npy", objs, allow_pickle=True)
    _assert_features_error(tmp_path, "object")


def test_two_dimensional_features(tmp_path: Path) -> None:
    _good_split(tmp_path)
    np.save(tmp_path / "train_ims.npy", np.zeros((N_IMAGES, DIM), np.float32))
    _assert_features_error(tmp_path, "3-D", f"({N_IMAGES}, {DIM})")


def test_integer_features(tmp_path: Path) -> None:
    _good_split(tmp_path)
    np.save(tmp_path / "train_ims.npy", np.zeros((N_IMAGES, N_REGIONS, DIM), np.int32))
    _assert_features_error(tmp_path, "int32")


def test_float64_features(tmp_path: Path) -> None:
    _good_split(tmp_path)
    np.save(tmp_path / "train_ims.npy", _features(dtype=np.float64))
    _assert_features_error(tmp_path, "float64")


def test_zero_images(tmp_path: Path) -> None:
    _good_split(tmp_path)
    np.save(tmp_path / "train_ims.npy", np.zeros((0, N_REGIONS, DIM), np.float32))
    _assert_features_error(tmp_path, "no images")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features(tmp_path: Path, value: float) -> None:
    images, _ = _good_split(tmp_path)
    bad = images.copy()
    bad[2, 1, 3] = value
    np.save(tmp_path / "train_ims.npy", bad)
    _assert_features_error(tmp_path, "image 2", "region 1, dim 3", "non-finite")


# ----------------------------------------------------------------------------- bad captions


def _assert_captions_error(tmp_path: Path, line: int | None, *fragments: str) -> DataError:
    with pytest.raises(DataError) as info:
        read_precomp(tmp_path, "train")
    msg = str(info.value)
    assert "train_caps.txt" in msg, msg
    if line is not None:
        assert f"line {line}:" in msg, msg
    assert info.value.line == line
    for fragment in fragments:
        assert fragment in msg, msg
    return info.value


def test_one_caption_missing(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", _features())
    _write_caps_bytes(tmp_path, b"\n".join(_caption_lines(N_IMAGES * CPI - 1)) + b"\n")
    _assert_captions_error(
        tmp_path,
        None,
        "19 captions for 4 images",
        "train_ims.npy",
        "expected 20 (5 per image)",
        "1 caption line missing",
    )


def test_one_caption_too_many(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", _features())
    _write_caps_bytes(tmp_path, b"\n".join(_caption_lines(N_IMAGES * CPI + 1)) + b"\n")
    _assert_captions_error(
        tmp_path,
        None,
        "21 captions for 4 images",
        "expected 20 (5 per image)",
        "1 caption line too many",
    )


def test_blank_line_in_the_middle(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", _features())
    lines = _caption_lines(N_IMAGES * CPI)
    lines[6] = b""
    _write_caps_bytes(tmp_path, b"\n".join(lines) + b"\n")
    _assert_captions_error(tmp_path, 7, "empty")


def test_extra_blank_line_at_end(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", _features())
    _write_caps_bytes(tmp_path, b"\n".join(_caption_lines(N_IMAGES * CPI)) + b"\n\n")
    _assert_captions_error(tmp_path, N_IMAGES * CPI + 1, "empty")


def test_whitespace_only_line(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", _features())
    lines = _caption_lines(N_IMAGES * CPI)
    lines[11] = b" \t  "
    _write_caps_bytes(tmp_path, b"\r\n".join(lines) + b"\r\n")
    _assert_captions_error(tmp_path, 12, "blank")


def test_non_utf8_bytes_on_a_line(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", _features())
    lines = _caption_lines(N_IMAGES * CPI)
    lines[13] = "a café in latin-1".encode("latin-1")
    _write_caps_bytes(tmp_path, b"\n".join(lines) + b"\n")
    _assert_captions_error(tmp_path, 14, "UTF-8", "0xe9")


def test_bare_carriage_return_line_endings(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", _features())
    _write_caps_bytes(tmp_path, b"\r".join(_caption_lines(N_IMAGES * CPI)) + b"\r")
    _assert_captions_error(tmp_path, 1, "carriage return")


def test_iter_caption_lines_numbers_from_one(tmp_path: Path) -> None:
    path = _write_caps_bytes(tmp_path, b"one\r\ntwo\nthree")
    assert list(iter_caption_lines(path)) == [(1, "one"), (2, "two"), (3, "three")]
    assert list(iter_caption_lines(_write_caps_bytes(tmp_path, b"", split="e"))) == []


# ----------------------------------------------------------------------------- missing files


def test_missing_features_file(tmp_path: Path) -> None:
    _good_split(tmp_path)
    (tmp_path / "train_ims.npy").unlink()
    err = _assert_features_error(tmp_path, "missing")
    assert Path(err.path) == tmp_path / "train_ims.npy"


def test_missing_captions_file(tmp_path: Path) -> None:
    _good_split(tmp_path)
    (tmp_path / "train_caps.txt").unlink()
    err = _assert_captions_error(tmp_path, None, "missing")
    assert Path(err.path) == tmp_path / "train_caps.txt"


def test_missing_split_names_present_splits(tmp_path: Path) -> None:
    _good_split(tmp_path, "dev")
    with pytest.raises(DataError, match=r"test_ims\.npy.*splits present.*dev"):
        read_precomp(tmp_path, "test")


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError, match="does not exist") as info:
        read_precomp(missing, "train")
    assert str(missing) in str(info.value)


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    _good_split(tmp_path)
    with pytest.raises(ValueError):
        read_precomp(tmp_path, "train", captions_per_image=0)
    with pytest.raises(ValueError):
        read_precomp(tmp_path, "../train")


# ----------------------------------------------------------------------------- writer


@pytest.mark.parametrize(
    ("captions", "fragment", "line"),
    [
        (["x"] * 19, "19 captions for 4 images", None),
        (["x"] * 21, "21 captions for 4 images", None),
        (["x"] * 5 + ["two\nlines"] + ["x"] * 14, "line break", 6),
        (["x"] * 5 + ["cr\r"] + ["x"] * 14, "line break", 6),
        (["x"] * 2 + ["   "] + ["x"] * 17, "blank", 3),
    ],
)
def test_write_precomp_refuses_bad_captions(
    tmp_path: Path, captions: list[str], fragment: str, line: int | None
) -> None:
    with pytest.raises(DataError, match=fragment) as info:
        write_precomp(tmp_path, "train", _features(), captions)
    assert "train_caps.txt" in str(info.value)
    assert info.value.line == line
    assert list(tmp_path.iterdir()) == []  # nothing written when validation fails


def test_write_precomp_refuses_bad_features(tmp_path: Path) -> None:
    bad = _features()
    bad[1, 0, 0] = np.inf
    with pytest.raises(DataError, match="image 1"):
        write_precomp(tmp_path, "train", bad, _captions())
    with pytest.raises(DataError, match="float64"):
        write_precomp(tmp_path, "train", _features(dtype=np.float64), _captions())
    assert list(tmp_path.iterdir()) == []


def test_write_precomp_replaces_existing_split(tmp_path: Path) -> None:
    _good_split(tmp_path)
    old = read_precomp(tmp_path, "train")  # an open memmap of the old file
    new_images = _features(2) + 1
    write_precomp(tmp_path / ".", "train", new_images, _captions(2))
    new = read_precomp(tmp_path, "train")
    np.testing.assert_array_equal(np.asarray(new.images), new_images)
    assert old.n_images == N_IMAGES  # the old mapping still reads the replaced inode
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    if hasattr(os, "umask"):
        mode = (tmp_path / "train_ims.npy").stat().st_mode & 0o777
        assert mode & 0o044, oct(mode)  # not tempfile's 0600
