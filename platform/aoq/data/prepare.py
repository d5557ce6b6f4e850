"""Driver-side data preparation: validate every split, settle the vocabulary, cache tokens.

This runs once, before any worker starts, so that bad data fails fast with a message
naming the file and line, and so that workers only memory-map finished files. Its
result, :class:`PreparedData`, is a small picklable record of paths and sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aoq.atomic import atomic_write_text
from aoq.data.captions import TokenizedCaptions, cached_tokens, file_digest, read_cache, writable_dir
from aoq.data.emoji import ensure_emoji
from aoq.data.errors import DataError
from aoq.data.precomp import read_precomp
from aoq.data.scenes import ensure_scenes
from aoq.data.text import Vocabulary, build_vocabulary, tokenize

#: A user vocabulary that leaves more than this share of training tokens unknown is
#: almost certainly for other data (or another tokenizer); refuse it rather than train
#: on a sea of <unk>.
MAX_UNKNOWN_SHARE = 0.5


@dataclass(frozen=True)
class SplitInfo:
    """Sizes of one split and where its cached tokens are."""

    name: str
    n_images: int
    n_regions: int
    feature_dim: int
    tokens_path: str


@dataclass(frozen=True)
class DataSignature:
    """What a model's weights depend on in the data: the vocabulary (its words, in
    order, not only their number) and the shape of an image's features. Stored with
    the weights so that a checkpoint is used only with data it fits.

    Attributes:
        vocab_size: words including the 4 specials.
        vocab_fingerprint: :meth:`aoq.data.text.Vocabulary.fingerprint` of the words.
        n_regions, feature_dim: an image's features are (n_regions, feature_dim).
    """

    vocab_size: int
    vocab_fingerprint: str
    n_regions: int
    feature_dim: int


@dataclass(frozen=True)
class PreparedData:
    """Everything a worker needs to open the data, as plain values."""

    directory: str
    vocab_path: str
    vocab_size: int
    captions_per_image: int
    splits: dict[str, SplitInfo]
    vocab_fingerprint: str = ""

    @property
    def feature_dim(self) -> int:
        return next(iter(self.splits.values())).feature_dim

    @property
    def signature(self) -> DataSignature:
        first = next(iter(self.splits.values()))
        return DataSignature(self.vocab_size, self.vocab_fingerprint, first.n_regions,
                             first.feature_dim)


@dataclass(frozen=True)
class SplitArrays:
    """One split opened for reading: memory-mapped features and tokens.

    Attributes:
        images: (n_images, n_regions, feature_dim) read-only memmap.
        tokens: token ids of the ``captions_per_image * n_images`` captions.
    """

    images: np.ndarray
    tokens: TokenizedCaptions
    captions_per_image: int

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_captions(self) -> int:
        return len(self.tokens)


def dataset_directory(cfg, *, progress: bool = False) -> Path:
    """The precomp directory of ``cfg.dataset``, building ``scenes`` or ``emoji`` on
    first use."""
    if cfg.dataset == "scenes":
        return ensure_scenes(cfg.scenes, Path(cfg.cache_dir), progress=progress)
    if cfg.dataset == "emoji":
        return ensure_emoji(cfg.emoji, Path(cfg.cache_dir), progress=progress)
    directory = Path(cfg.dataset)
    if not directory.is_dir():
        raise DataError("data.dataset: no such directory (expected 'scenes', 'emoji' or a "
                        "directory in the precomp layout)", path=directory)
    return directory


def _stamp_path(cache_dir: Path, features: Path) -> Path:
    key = hashlib.sha256(str(features.resolve()).encode()).hexdigest()[:16]
    return cache_dir / "validated" / f"{key}.json"


def _stamp(features: Path) -> dict:
    st = features.stat()
    return {"path": str(features.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_split(directory: Path, split: str, cfg, cache_dir: Path, progress: bool):
    """read_precomp, skipping the full finiteness scan of a features file already scanned
    (same path, size and mtime): on COCO train it reads 33 GB."""
    features = directory / f"{split}_ims.npy"
    stamp_file = _stamp_path(cache_dir, features)
    done = False
    if features.exists() and stamp_file.exists():
        try:
            done = json.loads(stamp_file.read_text()) == _stamp(features)
        except (OSError, ValueError):
            done = False
    data = read_precomp(directory, split, captions_per_image=cfg.captions_per_image,
                        check_finite=not done, progress=progress,
                        max_caption_bytes=cfg.max_caption_bytes)
    if not done:
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp_file, json.dumps(_stamp(features)))
    return data


def _settle_vocabulary(cfg, train, token_dir: Path) -> tuple[Vocabulary, Path, list[list[str]] | None]:
    """The vocabulary (the user's, checked against the data, or one built from train),
    its path, and the train token lists if they had to be computed (else None)."""
    if cfg.vocab:
        path = Path(cfg.vocab)
        vocab = Vocabulary.load(path)
        tokens = [tokenize(c) for c in train.captions]
        total = sum(len(t) for t in tokens)
        unknown = sum(1 for t in tokens for w in t if vocab.id(w) == 3)
        if total and unknown / total > MAX_UNKNOWN_SHARE:
            raise DataError(
                f"{unknown / total:.0%} of the training tokens of {train.captions_path} are "
                "not in this vocabulary: it does not match the data", path=path)
        return vocab, path, tokens
    path = token_dir / f"vocab.{file_digest(train.captions_path)}.min{cfg.min_word_count}.json"
    if path.exists():
        # Keyed by the caption file's hash, so an existing one is up to date.
        return Vocabulary.load(path), path, None
    tokens = [tokenize(c) for c in train.captions]
    vocab = build_vocabulary(tokens, min_count=cfg.min_word_count)
    vocab.save(path)
    return vocab, path, tokens


def _check_token_counts(split, tokens_path: Path, max_tokens: int) -> None:
    """Refuse a caption with more than ``max_tokens`` tokens, naming its file and line
    (caption j is line j + 1: every line is a caption). A batch is padded to its
    longest caption, so one huge caption would blow up every step that draws it."""
    lengths = read_cache(tokens_path).lengths - 2  # <start> and <end>
    over = np.flatnonzero(lengths > max_tokens)
    if len(over):
        j = int(over[0])
        raise DataError(f"caption has {int(lengths[j])} tokens; at most {max_tokens} "
                        f"(data.max_caption_tokens); {len(over)} caption(s) of the split "
                        "are longer", path=split.captions_path, line=j + 1)


def prepare_data(cfg, *, progress: bool = True) -> PreparedData:
    """Validate train/dev/test, settle the vocabulary and cache tokenized captions.

    Args:
        cfg: the ``data`` section of the config (``aoq.config.DataConfig``).
        progress: show progress bars (scene generation, finiteness scans).

    Raises:
        DataError: naming the file (and line) of the first problem found.
    """
    directory = dataset_directory(cfg, progress=progress)
    cache_dir = Path(cfg.cache_dir)
    token_dir = writable_dir(directory, cache_dir / "captions" /
                             hashlib.sha256(str(directory).encode()).hexdigest()[:16])
    names = list(dict.fromkeys([cfg.train_split, cfg.dev_split, cfg.test_split]))
    splits = {name: _read_split(directory, name, cfg, cache_dir, progress) for name in names}
    train = splits[cfg.train_split]
    vocab, vocab_path, train_tokens = _settle_vocabulary(cfg, train, token_dir)
    dims = {(s.n_regions, s.feature_dim) for s in splits.values()}
    if len(dims) != 1:
        raise DataError(f"splits disagree on (regions, feature_dim): "
                        + ", ".join(f"{s.split}={s.n_regions, s.feature_dim}"
                                    for s in splits.values()), path=directory)
    infos = {}
    for name, split in splits.items():
        tokens_path = cached_tokens(
            token_dir, name, split.captions_path, split.captions, vocab,
            token_lists=train_tokens if name == cfg.train_split else None)
        _check_token_counts(split, tokens_path, cfg.max_caption_tokens)
        infos[name] = SplitInfo(name, split.n_images, split.n_regions, split.feature_dim,
                                str(tokens_path))
    return PreparedData(str(directory), str(vocab_path), len(vocab), cfg.captions_per_image,
                        infos, vocab_fingerprint=vocab.fingerprint())


def open_split(prepared: PreparedData, split: str) -> SplitArrays:
    """Memory-map a prepared split (cheap; no validation is repeated)."""
    info = prepared.splits[split]
    images = np.load(os.path.join(prepared.directory, f"{split}_ims.npy"), mmap_mode="r",
                     allow_pickle=False)
    return SplitArrays(images, read_cache(info.tokens_path), prepared.captions_per_image)
