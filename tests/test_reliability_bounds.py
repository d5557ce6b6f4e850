"""Principle 2: input is bounded. No caption, vocabulary, YAML or study file can make a
job's memory or time grow without bound; each limit is refused naming file and line.

Memory is measured, not assumed: ``tracemalloc`` sees every Python allocation, so a
reader that pulled a 64 MB line into memory before refusing it would show it.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from aoq.config import ConfigError, load_config, read_yaml
from aoq.config.loader import MAX_YAML_BYTES
from aoq.config.tune_space import MAX_LIST_VALUES, load_space
from aoq.data import DataError
from aoq.data.precomp import read_precomp
from aoq.data.prepare import prepare_data
from aoq.data.text import MAX_VOCAB_FILE_BYTES, Vocabulary

from test_reliability_input import replace_line, write_dataset

pytestmark = pytest.mark.usefixtures("no_ray")


def data_config(tmp: Path, data: Path, *extra: str):
    return load_config(None, [f"data.dataset={data}", f"data.cache_dir={tmp / 'cache'}",
                              "data.min_word_count=1", *extra]).data


def test_a_huge_caption_line_is_refused_without_reading_it(tmp_path: Path) -> None:
    """Before: a 10 MB caption was accepted and a worker grew to 12.4 GB."""
    data = write_dataset(tmp_path / "data")
    replace_line(data / "train_caps.txt", 8, b"a red cube " * ((64 << 20) // 11))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            read_precomp(data, "train")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == (f"{data / 'train_caps.txt'}, line 8: caption line longer than "
                               "4096 bytes (the limit, data.max_caption_bytes)")
    assert peak < 1 << 20, f"reading the split allocated {peak} bytes"


def test_the_caption_byte_limit_is_an_option(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    long_word = "a " + "x" * 5000  # 5 kB, 2 tokens
    replace_line(data / "dev_caps.txt", 3, long_word.encode())
    with pytest.raises(DataError, match=r"dev_caps.txt, line 3: caption line longer than 4096"):
        prepare_data(data_config(tmp_path, data), progress=False)
    prepared = prepare_data(data_config(tmp_path, data, "data.max_caption_bytes=8192"),
                            progress=False)
    assert prepared.splits["dev"].n_images == 10


def test_a_caption_with_too_many_tokens_is_refused(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    replace_line(data / "test_caps.txt", 21, " ".join(["red"] * 300).encode())  # 1.2 kB
    with pytest.raises(DataError) as info:
        prepare_data(data_config(tmp_path, data), progress=False)
    assert str(info.value).startswith(f"{data / 'test_caps.txt'}, line 21: caption has 300 "
                                      "tokens; at most 256 (data.max_caption_tokens)")
    assert prepare_data(data_config(tmp_path, data, "data.max_caption_tokens=300"),
                        progress=False).splits["test"].n_images == 10


def test_a_huge_vocabulary_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    with open(path, "wb") as fh:
        fh.truncate(MAX_VOCAB_FILE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(DataError, match=rf"vocab.json: {MAX_VOCAB_FILE_BYTES + 1} bytes; a "
                                        "vocabulary file is at most"):
        Vocabulary.load(path)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested.json: not a JSON vocabulary file"):
        Vocabulary.load(nested)


def test_yaml_size_nesting_and_alias_bombs_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(MAX_YAML_BYTES + 1)
    with pytest.raises(ConfigError, match=rf"big.yaml: {MAX_YAML_BYTES + 1} bytes; a YAML "
                                          "file here is at most"):
        read_yaml(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(ConfigError, match="deep.yaml"):
        read_yaml(deep)
    # A billion laughs: nine levels of nine aliases expand to 9^9 strings if stringified.
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("tracking:\n  tags:\n" + "\n".join(f"    {line}" for line in levels) +
                    "\n    boom: *a9\n")
    with pytest.raises(ConfigError, match="tracking.tags.a0: expected a string, got a list"):
        load_config(bomb)


def test_search_space_lists_are_bounded_and_scalar(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    values = list(range(MAX_LIST_VALUES + 1))
    space.write_text(f"params:\n  run.seed: {{distribution: choice, values: {values}}}\n")
    with pytest.raises(ConfigError, match=rf"params.run.seed: {MAX_LIST_VALUES + 1} values; "
                                          rf"at most {MAX_LIST_VALUES}"):
        load_space(space)
    space.write_text("params:\n  loss.variant: {distribution: choice, values: [[aoq]]}\n")
    with pytest.raises(ConfigError, match="values must be scalars, not a list"):
        load_space(space)
    ranges = "\n".join(f"  {k}: {{distribution: uniform, low: 0.1, high: 0.2}}" for k in (
        "loss.margin_online", "loss.margin_offline", "loss.alpha", "loss.beta",
        "optim.lr", "optim.weight_decay", "optim.grad_clip", "model.lambda_softmax",
        "model.lambda_lse", "model.region_dropout", "model.word_dropout"))
    space.write_text(f"params:\n{ranges}\n")
    with pytest.raises(ConfigError, match="make 2048 combinations; at most 1024"):
        load_space(space)


def test_config_sizes_have_upper_bounds() -> None:
    """Values that only failed (or ran out of memory) inside a worker are refused now."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.embed_dim=1000000000", "run.seed=-1",
                           "data.scenes.n_train=1000000000", "negatives.block_rows=0",
                           "data.loader_workers=100000", "run.start_retries=-1"])
    text = str(info.value)
    for needle in ("model.embed_dim=1000000000: must be <= 16384", "run.seed=-1: must be >= 0",
                   "data.scenes.n_train=1000000000: must be <= 2000000",
                   "negatives.block_rows=0: must be >= 1",
                   "data.loader_workers=100000: must be <= 64",
                   "run.start_retries=-1: must be >= 0"):
        assert needle in text, text


def test_a_study_file_that_is_not_one_is_refused(tmp_path: Path) -> None:
    from aoq.cluster.tune_study import MAX_STUDY_FILE_BYTES, load_spec

    study = tmp_path / "study.json"
    with open(study, "wb") as fh:
        fh.truncate(MAX_STUDY_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match="larger than a study file can be"):
        load_spec(tmp_path)
    study.write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(ConfigError, match="not a study file"):
        load_spec(tmp_path)
    study.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ConfigError, match="missing .*'samples'"):
        load_spec(tmp_path)


def test_features_wider_than_a_batch_can_hold_are_refused(tmp_path: Path) -> None:
    import numpy as np

    data = write_dataset(tmp_path / "data")
    np.save(data / "dev_ims.npy", np.zeros((10, 2000, 8), np.float16))
    with pytest.raises(DataError, match=r"dev_ims.npy: 2000 regions x 8 dimensions per image; "
                                        r"at most 1024 x 16384"):
        read_precomp(data, "dev")


def test_local_path_options_refuse_uris(tmp_path: Path) -> None:
    from aoq.config.paths import check_paths

    cfg = load_config(None, ["data.cache_dir=s3://bucket/cache", "run.storage=s3://b/runs"])
    with pytest.raises(ConfigError) as info:
        check_paths(cfg)
    assert "data.cache_dir='s3://bucket/cache': must be a local path, not a URI" in str(info.value)
    assert "run.storage" not in str(info.value)  # a URI is what run.storage may be
