"""Tokenizer and vocabulary in SCAN's json layout.

Tokens come from nltk's Treebank tokenizer on the lower-cased caption: the same rules as
the ``word_tokenize`` the public repos use, minus the sentence splitter that needs a
downloaded model (``punkt``), so nothing is fetched at run time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from aoq.data.errors import DataError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0..3, fixed by the SCAN layout
#: COCO's SCAN vocabulary file is about 0.5 MB; a file far larger is not a vocabulary,
#: and reading it whole must not be able to exhaust memory.
MAX_VOCAB_FILE_BYTES = 64 << 20
#: COCO has 11,353 words, Flickr30K 8,481; a million is far beyond any caption set.
MAX_VOCAB_WORDS = 1_000_000


@lru_cache(maxsize=1)
def _treebank():
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


def tokenize(caption: str) -> list[str]:
    """Lower-cased Treebank tokens of one caption."""
    return _treebank().tokenize(caption.lower())


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id mapping; ids 0..3 are ``<pad> <start> <end> <unk>``."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    @property
    def word2idx(self) -> dict[str, int]:
        return dict(self._index)  # type: ignore[attr-defined]

    def id(self, word: str) -> int:
        """The id of ``word``, or ``<unk>``'s id (3) if it is not in the vocabulary."""
        return self._index.get(word, 3)  # type: ignore[attr-defined]

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """``<start>`` + ids of ``tokens`` + ``<end>``, as every public loader does."""
        index = self._index  # type: ignore[attr-defined]
        return [1, *(index.get(t, 3) for t in tokens), 2]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids``, dropping pad/start/end."""
        return [self.words[i] for i in ids if i > 2]

    def fingerprint(self) -> str:
        """A short hash of the word list; caches keyed by it go stale with the vocab."""
        return hashlib.sha256("\n".join(self.words).encode("utf-8")).hexdigest()[:16]

    # ------------------------------------------------------------------ SCAN json

    def to_json(self) -> dict:
        """SCAN's layout: ``{"word2idx": {...}, "idx2word": {"0": ...}, "idx": N}``."""
        return {
            "word2idx": {w: i for i, w in enumerate(self.words)},
            "idx2word": {str(i): w for i, w in enumerate(self.words)},
            "idx": len(self.words),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write SCAN-layout json atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read and check a SCAN-layout vocabulary file.

        Raises:
            DataError: naming the file and what does not match the layout.
        """
        path = Path(path)
        try:
            if not path.is_file():
                raise DataError("vocabulary file not found" if not path.exists() else
                                "not a regular file (a vocabulary is a JSON file)", path=path)
            size = path.stat().st_size
            if size > MAX_VOCAB_FILE_BYTES:
                raise DataError(f"{size} bytes; a vocabulary file is at most "
                                f"{MAX_VOCAB_FILE_BYTES} bytes", path=path)
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise DataError(f"not a JSON vocabulary file ({type(exc).__name__})", path=path
                            ) from None
        except OSError as exc:
            raise DataError(f"cannot read the vocabulary file ({exc.strerror or exc})",
                            path=path) from None
        if not isinstance(data, dict) or "word2idx" not in data:
            raise DataError('expected SCAN layout {"word2idx": ..., "idx2word": ..., "idx": N}',
                            path=path)
        word2idx = data["word2idx"]
        if not isinstance(word2idx, dict) or not word2idx:
            raise DataError("word2idx must be a non-empty mapping", path=path)
        size = len(word2idx)
        if size > MAX_VOCAB_WORDS:
            raise DataError(f"{size} words; a vocabulary has at most {MAX_VOCAB_WORDS} (its "
                            "embedding table is vocabulary x word_dim)", path=path)
        words: list[str | None] = [None] * size
        for word, idx in word2idx.items():
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < size or \
                    words[idx] is not None:
                raise DataError(f"word2idx[{word!r}]={idx!r}: ids must be 0..{size - 1}, "
                                "each used once", path=path)
            words[idx] = word
        for i, special in enumerate(SPECIALS):
            if words[i] != special:
                raise DataError(f"id {i} must be {special!r}, found {words[i]!r}", path=path)
        idx2word = data.get("idx2word")
        if isinstance(idx2word, dict):
            for key, word in idx2word.items():
                if not str(key).isdigit() or int(key) >= size or words[int(key)] != word:
                    raise DataError(f"idx2word[{key!r}]={word!r} disagrees with word2idx",
                                    path=path)
        if "idx" in data and data["idx"] != size:
            raise DataError(f"idx={data['idx']!r} but word2idx has {size} words", path=path)
        return cls(tuple(words))  # type: ignore[arg-type]


def build_vocabulary(token_lists: Iterable[Sequence[str]], min_count: int = 4) -> Vocabulary:
    """Words seen at least ``min_count`` times, most frequent first (ties alphabetical),
    after the four specials. Built from training captions only."""
    counts: Counter[str] = Counter()
    for tokens in token_lists:
        counts.update(tokens)
    kept = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                  key=lambda w: (-counts[w], w))
    return Vocabulary((*SPECIALS, *kept))
