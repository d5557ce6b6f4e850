"""Tokenizer, SCAN-layout vocabulary, and the Arrow caption cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aoq.data import DataError, Vocabulary, build_vocabulary, tokenize
from aoq.data.captions import cached_tokens, encode_captions, read_cache


def test_tokenize_is_lowercase_treebank_without_downloads() -> None:
    assert tokenize("A Dog's ball, left of the cat.") == ["a", "dog", "'s", "ball", ",", "left",
                                                         "of", "the", "cat", "."]


def test_vocabulary_round_trips_in_scan_layout(tmp_path: Path) -> None:
    tokens = [["a", "dog"], ["a", "cat"], ["a", "dog"], ["the", "dog"]]
    vocab = build_vocabulary(tokens, min_count=2)
    assert vocab.words[:4] == ("<pad>", "<start>", "<end>", "<unk>")
    assert vocab.words[4:] == ("a", "dog")  # frequency order; "cat"/"the" below min_count
    path = tmp_path / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert data["idx"] == 6 and data["word2idx"]["dog"] == 5 and data["idx2word"]["5"] == "dog"
    assert Vocabulary.load(path) == vocab
    assert vocab.encode(["a", "cat"]) == [1, 4, 3, 2]


@pytest.mark.parametrize("content, needle", [
    ("not json", "not a JSON vocabulary"),
    (json.dumps({"words": []}), "expected SCAN layout"),
    (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "a": 3}}),
     "id 3 must be '<unk>'"),
    (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "idx": 9}),
     "idx=9"),
    (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 7}}),
     "ids must be 0..3"),
])
def test_bad_vocabulary_files_name_the_file(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "v.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        Vocabulary.load(path)
    assert "v.json" in str(info.value) and needle in str(info.value)


def test_caption_cache_round_trip_and_staleness(tmp_path: Path) -> None:
    caps = ["a dog", "a cat on a mat", "dog"]
    f = tmp_path / "train_caps.txt"
    f.write_text("\n".join(caps) + "\n")
    vocab = build_vocabulary([tokenize(c) for c in caps], min_count=1)
    path = cached_tokens(tmp_path, "train", f, caps, vocab)
    tokens = read_cache(path)
    direct = encode_captions(caps, vocab)
    assert np.array_equal(tokens.offsets, direct.offsets)
    assert np.array_equal(tokens.values, direct.values)
    ids, lengths = tokens.batch(np.array([1, 2]))
    assert lengths.tolist() == [7, 3]
    assert ids[1].tolist() == [1, vocab.id("dog"), 2, 0, 0, 0, 0]
    # Same inputs: the same file is reused.
    assert cached_tokens(tmp_path, "train", f, caps, vocab) == path
    # A changed caption file gives a new cache and removes the stale one.
    caps2 = caps + ["a mat", "x", "y"]
    f.write_text("\n".join(caps2) + "\n")
    path2 = cached_tokens(tmp_path, "train", f, caps2, vocab)
    assert path2 != path and not path.exists() and len(read_cache(path2)) == 6
    # A changed vocabulary, too.
    vocab2 = build_vocabulary([tokenize(c) for c in caps2], min_count=1)
    path3 = cached_tokens(tmp_path, "train", f, caps2, vocab2)
    assert path3 != path2 and not path2.exists()


def test_unreadable_cache_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "train_caps.tokens.x.y.arrow"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable caption cache"):
        read_cache(bad)
