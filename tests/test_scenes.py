"""The built-in scenes dataset: deterministic, valid precomp, compositional splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from aoq.config import ScenesConfig
from aoq.data import read_precomp
from aoq.data.prepare import prepare_data, open_split
from aoq.config import DataConfig
from aoq.data.scenes import COLOURS, OBJECTS, ensure_scenes, generate_scenes

SMALL = ScenesConfig(n_train=200, n_dev=40, n_test=100, feature_dim=32)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.suffix in (".npy", ".txt")}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = generate_scenes(SMALL, tmp_path / "a")
    b = generate_scenes(SMALL, tmp_path / "b")
    c = generate_scenes(ScenesConfig(**{**SMALL.__dict__, "seed": 1}), tmp_path / "c")
    assert digest(a) == digest(b)
    assert digest(a)["train_ims.npy"] != digest(c)["train_ims.npy"]


def test_splits_read_back_with_the_strict_reader(tmp_path: Path) -> None:
    d = generate_scenes(SMALL, tmp_path / "s")
    for split, n in (("train", 200), ("dev", 40), ("test", 100)):
        data = read_precomp(d, split)
        assert data.images.shape == (n, 36, 32) and data.images.dtype == np.float32
        assert data.n_captions == 5 * n


def _pairs(caption: str) -> set[str]:
    words = caption.replace(",", " ").split()
    synonyms = {s: k for k, v in OBJECTS.items() for s in v}
    return {f"{w} {synonyms[n]}" for w, n in zip(words, words[1:])
            if w in COLOURS and n in synonyms}


def test_test_scenes_hold_unseen_colour_object_pairs(tmp_path: Path) -> None:
    d = generate_scenes(ScenesConfig(n_train=400, n_dev=40, n_test=100, feature_dim=16),
                        tmp_path / "s")
    held = set(json.loads((d / "scenes.json").read_text())["heldout_pairs"])
    assert held
    train_caps = read_precomp(d, "train").captions
    train_pairs = set().union(*map(_pairs, train_caps))
    assert not train_pairs & held
    test = read_precomp(d, "test").captions
    # The first caption of each image lists every object with its colour.
    assert all(_pairs(test[5 * i]) & held for i in range(100))


def test_near_miss_families_exist_in_train(tmp_path: Path) -> None:
    d = generate_scenes(ScenesConfig(n_train=400, n_dev=40, n_test=100, feature_dim=16,
                                     family_size=4), tmp_path / "s")
    caps = read_precomp(d, "train").captions
    # Per image, the set of (colour object) pairs; family variants share most of them.
    pairs = [frozenset(_pairs(caps[5 * i])) for i in range(400)]
    close = sum(1 for i in range(400) for j in range(i + 1, 400)
                if len(pairs[i] & pairs[j]) >= max(len(pairs[i]), len(pairs[j])) - 1
                and pairs[i] != pairs[j])
    assert close >= 100  # at least ~one near miss per family


def test_ensure_scenes_caches_and_prepare_is_idempotent(tmp_path: Path) -> None:
    first = ensure_scenes(SMALL, tmp_path)
    stamp = (first / "train_ims.npy").stat().st_mtime_ns
    assert ensure_scenes(SMALL, tmp_path) == first
    assert (first / "train_ims.npy").stat().st_mtime_ns == stamp
    cfg = DataConfig(cache_dir=str(tmp_path), scenes=SMALL)
    prepared = prepare_data(cfg, progress=False)
    assert prepared.splits["test"].n_images == 100 and prepared.feature_dim == 32
    again = prepare_data(cfg, progress=False)
    assert again == prepared
    split = open_split(prepared, "train")
    assert isinstance(split.images, np.memmap) and split.n_captions == 1000
