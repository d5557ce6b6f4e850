"""The built-in emoji dataset: built offline from the installed packages, deterministic,
5 captions per image, disjoint splits, pictures beside the features."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from aoq.config import DataConfig, EmojiConfig
from aoq.data import read_precomp
from aoq.data.emoji import ensure_emoji, image_file
from aoq.data.emoji_render import FEATURE_DIM, GRID, region_features
from aoq.data.emoji_text import caption_lines, _Sources
from aoq.data.errors import DataError
from aoq.data.prepare import prepare_data

SMALL = EmojiConfig(max_images=60, n_test=20, n_dev=10, image_size=48)

# The build runs in a fresh interpreter whose every socket call raises (an audit hook
# sees connect, getaddrinfo and friends, whoever makes them): a build that reached for
# the network would fail, not silently download.
OFFLINE_BUILD = textwrap.dedent("""
    import sys
    def no_network(event, args):
        if event.startswith("socket.") and event != "socket.__new__":
            raise RuntimeError(f"network used during the build: {event}")
    sys.addaudithook(no_network)
    from aoq.config import EmojiConfig
    from aoq.data.emoji import generate_emoji
    generate_emoji(EmojiConfig(max_images=60, n_test=20, n_dev=10, image_size=48),
                   sys.argv[1])
""")


def build_offline(directory: Path) -> Path:
    subprocess.run([sys.executable, "-c", OFFLINE_BUILD, str(directory)], check=True,
                   timeout=300)
    return directory


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("emoji")
    return build_offline(root / "a"), build_offline(root / "b")


def test_offline_build_is_deterministic(built: tuple[Path, Path]) -> None:
    a, b = built
    assert digests(a) == digests(b)
    assert any(name.endswith(".png") for name in digests(a))


def test_every_image_has_five_captions_and_a_picture(built: tuple[Path, Path]) -> None:
    a, _ = built
    manifest = json.loads((a / "emoji.json").read_text())
    sizes = {"train": 30, "dev": 10, "test": 20}
    total_left_out = manifest["left_out"]["same picture as another emoji"]
    assert sum(manifest["sizes"].values()) == 60 - total_left_out
    for split in ("dev", "test"):
        assert manifest["sizes"][split] == sizes[split]
    for split, n in manifest["sizes"].items():
        data = read_precomp(a, split)  # the strict reader: counts, dtype, finiteness
        assert data.images.shape == (n, GRID * GRID, FEATURE_DIM)
        assert data.n_captions == 5 * n
        assert len(manifest["rows"][split]) == n
        assert image_file(a, split, n - 1).exists() and not image_file(a, split, n).exists()
        # Row i of the features is the picture in <split>_images/<i>.png.
        from PIL import Image
        with Image.open(image_file(a, split, 0)) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        np.testing.assert_array_equal(region_features(rgb), data.images[0])


def test_splits_are_disjoint_down_to_families_and_caption_lines(
        built: tuple[Path, Path]) -> None:
    a, _ = built
    rows = json.loads((a / "emoji.json").read_text())["rows"]
    codes = {s: {r["code"] for r in rows[s]} for s in rows}
    families = {s: {r["family"] for r in rows[s]} for s in rows}
    for x, y in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not codes[x] & codes[y]
        assert not families[x] & families[y]
    owner: dict[str, str] = {}
    for split in rows:
        lines = (a / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            code = rows[split][i // 5]["code"]
            assert owner.setdefault(line, code) == code, f"{line!r} describes two emoji"


def test_skin_tone_variants_name_their_tone_in_every_caption() -> None:
    sources = _Sources()
    name, lines = caption_lines("\U0001F44D\U0001F3FD", sources)  # thumbs up, medium tone
    assert name == "thumbs up medium skin tone"
    assert all("medium skin tone" in line or "type-4" in line for line in lines)
    _, base_lines = caption_lines("\U0001F44D", sources)
    assert not set(lines) & set(base_lines)


def test_prepare_data_builds_emoji_once_and_reuses_it(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="emoji", cache_dir=str(tmp_path), emoji=SMALL)
    first = prepare_data(cfg, progress=False)
    stamp = (Path(first.directory) / "emoji.json").stat().st_mtime_ns
    second = prepare_data(cfg, progress=False)
    assert first.directory == second.directory
    assert (Path(second.directory) / "emoji.json").stat().st_mtime_ns == stamp
    assert ensure_emoji(SMALL, tmp_path) == Path(first.directory)
    assert first.splits["test"].n_images == 20 and first.feature_dim == FEATURE_DIM


def test_sizes_that_leave_no_training_images_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="leaves no training images"):
        ensure_emoji(EmojiConfig(max_images=30, n_test=20, n_dev=10, image_size=48), tmp_path)
