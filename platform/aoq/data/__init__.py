"""Data: the precomp reader, the built-in ``scenes`` generator, tokens and batches.

Plain NumPy/Arrow/PyTorch; no Ray.
"""

from aoq.data.emoji import ensure_emoji, generate_emoji
from aoq.data.errors import DataError
from aoq.data.precomp import PrecompSplit, iter_caption_lines, read_precomp, write_precomp
from aoq.data.prepare import PreparedData, SplitArrays, open_split, prepare_data
from aoq.data.scenes import ensure_scenes, generate_scenes
from aoq.data.text import Vocabulary, build_vocabulary, tokenize

__all__ = [
    "DataError", "PrecompSplit", "PreparedData", "SplitArrays", "Vocabulary",
    "build_vocabulary", "ensure_emoji", "ensure_scenes", "generate_emoji", "generate_scenes", "iter_caption_lines",
    "open_split", "prepare_data", "read_precomp", "tokenize", "write_precomp",
]
