"""Query a trained model: the images that best match a text, the captions of an image.

Scores are the model's own S(image, caption), the numbers ``jobs/evaluate.py`` ranks:
a text query is tokenized and encoded like a caption of the split and scored against
every image; an image query (an index of the split) is scored against every caption.
Cross-attention models (SCAN, BFAN) score every pair by attention, so the split is
scored in blocks (shards) of :data:`SCORE_BLOCK` items, never all pairs at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aoq.data.text import UNK, tokenize
from aoq.inspection.index import SplitIndex
from aoq.models.encode import eval_mode

#: Items scored per block against a query (bounds a cross-attention model's memory).
SCORE_BLOCK = 256
#: The longest text query accepted by default, in characters.
MAX_QUERY_CHARS = 500


class QueryError(ValueError):
    """A query that cannot be answered: empty or too long text, no known word, an image
    id out of range. The message says what is wrong."""


@dataclass(frozen=True)
class Hit:
    """One result: an image or caption index of the split, and its score."""

    index: int
    score: float


def check_text(text: str, max_chars: int = MAX_QUERY_CHARS) -> str:
    """``text`` stripped, refused when empty or longer than ``max_chars``."""
    stripped = text.strip()
    if not stripped:
        raise QueryError("the query text is empty")
    if len(stripped) > max_chars:
        raise QueryError(f"the query text has {len(stripped)} characters; at most "
                         f"{max_chars} are accepted")
    return stripped


def query_tokens(index: SplitIndex, text: str, max_chars: int = MAX_QUERY_CHARS
                 ) -> torch.Tensor:
    """(1, L) token ids of a text query, as a caption of the split is tokenized.

    Raises:
        QueryError: empty or too long text, or no word the model knows.
    """
    words = tokenize(check_text(text, max_chars))
    ids = index.vocab.encode(words)
    unknown = index.vocab.id(UNK)
    if not any(i != unknown for i in ids[1:-1]):
        shown = " ".join(words)[:200]
        raise QueryError(f"none of the words of {shown!r} is in the model's vocabulary "
                         f"({len(index.vocab)} words, from the training captions)")
    return torch.tensor([ids], dtype=torch.long)


def check_image_id(image: int, n_images: int, split: str) -> int:
    """``image`` if it is an image index of a split of ``n_images``, else QueryError."""
    if not 0 <= image < n_images:
        raise QueryError(f"image {image} is out of range: the {split} split has images "
                         f"0..{n_images - 1}")
    return image


def text_scores(index: SplitIndex, text: str, max_chars: int = MAX_QUERY_CHARS
                ) -> np.ndarray:
    """(n_images,) float32 scores S(image, text) of every image of the split."""
    tokens = query_tokens(index, text, max_chars)
    model = index.model
    with eval_mode(model):
        caption = model.encode_captions(tokens, torch.tensor([tokens.shape[1]]))
        blocks = [model.similarity(index.images[a:a + SCORE_BLOCK], caption)[:, 0]
                  for a in range(0, index.n_images, SCORE_BLOCK)]
    return torch.cat(blocks).float().numpy()


def image_scores(index: SplitIndex, image: int) -> np.ndarray:
    """(n_captions,) float32 scores S(image, caption) of every caption of the split."""
    check_image_id(image, index.n_images, index.split_name)
    model = index.model
    query = index.images[image:image + 1]
    with eval_mode(model):
        blocks = [model.similarity(query, index.captions[a:a + SCORE_BLOCK])[0]
                  for a in range(0, index.n_captions, SCORE_BLOCK)]
    return torch.cat(blocks).float().numpy()


def top_hits(scores: np.ndarray, k: int) -> list[Hit]:
    """The ``k`` best of (n,) ``scores``, best first (ties: lower index first)."""
    if k < 1:
        raise QueryError(f"k={k}: ask for at least one result")
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [Hit(int(i), float(scores[i])) for i in order]


def search_text(index: SplitIndex, text: str, k: int = 10,
                max_chars: int = MAX_QUERY_CHARS) -> list[Hit]:
    """The ``k`` images of the split that best match ``text`` (image indices)."""
    return top_hits(text_scores(index, text, max_chars), k)


def search_image(index: SplitIndex, image: int, k: int = 10) -> list[Hit]:
    """The ``k`` captions of the split that best match image ``image`` (caption indices;
    caption j describes image j // captions_per_image)."""
    return top_hits(image_scores(index, image), k)
