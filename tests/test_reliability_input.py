"""Bad data and bad config stop a job before any worker starts (scenarios 7 and 8).

Each case runs the real job entry (``run_training`` or ``jobs/train.py``) on real files
and checks the error names the file (and line) or the key, and that nothing started:
no Ray, no MLflow store, no run directory contents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aoq.cluster.job import run_training
from aoq.config import ConfigError, load_config
from aoq.data import DataError
from aoq.data.precomp import write_precomp
from aoq.negatives.tables import save_tables

# These jobs must stop before Ray starts, so none may be running beforehand.
pytestmark = pytest.mark.usefixtures("no_ray")

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_DEV, N_TEST = 30, 10, 10
WORDS = ["red", "blue", "green", "cube", "ball", "cone", "left", "right", "above", "below"]


def write_dataset(directory: Path) -> Path:
    """A small valid precomp dataset (captions from a 10-word vocabulary)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("dev", N_DEV), ("test", N_TEST)):
        images = rng.standard_normal((n, 4, 8)).astype(np.float32)
        captions = [f"a {WORDS[(j + 1) % 10]} {WORDS[j % 10]} {WORDS[(j * 7) % 10]} of "
                    f"a {WORDS[(j * 3) % 10]}" for j in range(5 * n)]
        write_precomp(directory, split, images, captions)
    return directory


def replace_line(path: Path, line: int, data: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = data
    path.write_bytes(b"\n".join(lines))


def drop_last_caption(d: Path) -> None:
    path = d / "train_caps.txt"
    path.write_bytes(b"\n".join(path.read_bytes().split(b"\n")[:-2]) + b"\n")


def nan_feature(d: Path) -> None:
    images = np.load(d / "test_ims.npy")
    images[3, 2, 1] = np.nan
    np.save(d / "test_ims.npy", images)


def foreign_vocabulary(d: Path) -> list[str]:
    words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "frisbee", "park", "man"]
    (d / "vocab.json").write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                              "idx": len(words)}))
    return [f"data.vocab={d / 'vocab.json'}"]


def tables(d: Path, bad: Callable[[np.ndarray, np.ndarray], None], n_images=N_TRAIN) -> list[str]:
    rng = np.random.default_rng(1)
    i2t = np.stack([rng.permutation(5 * n_images)[:60] for _ in range(n_images)])
    t2i = np.stack([rng.permutation(n_images)[:12] for _ in range(5 * n_images)])
    bad(i2t, t2i)
    save_tables(d / "tables", 1, i2t, t2i)
    return ["loss.variant=offtri", f"negatives.source=tables:{d / 'tables'}"]


def out_of_range(i2t: np.ndarray, t2i: np.ndarray) -> None:
    t2i[17, 4] = N_TRAIN  # image ids are 0..N_TRAIN-1


CASES = {
    # The skeleton's cases (each also unit-tested in test_precomp.py) ...
    "caption missing": (drop_last_caption, "train_caps.txt", "149 captions for 30 images"),
    "blank caption": (lambda d: replace_line(d / "dev_caps.txt", 7, b""),
                      "dev_caps.txt, line 7", "empty"),
    "not UTF-8": (lambda d: replace_line(d / "train_caps.txt", 12, "café".encode("latin-1")),
                  "train_caps.txt, line 12", "UTF-8"),
    "NaN feature": (nan_feature, "test_ims.npy", "non-finite"),
    # ... and the vocabulary and the tables.
    "vocabulary of other data": (foreign_vocabulary, "vocab.json", "does not match the data"),
    "table id out of range": (lambda d: tables(d, out_of_range), "t2i.npy",
                              f"t2i[17, 4] = {N_TRAIN} is out of range 0..{N_TRAIN - 1}"),
    "tables of other data": (lambda d: tables(d, lambda a, b: None, n_images=N_TRAIN + 2),
                             "i2t.npy", "belong to other data"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_stops_the_job_before_anything_starts(case: str, tmp_path: Path) -> None:
    import ray

    damage, where, what = CASES[case]
    data = write_dataset(tmp_path / "data")
    extra = damage(data) or []
    cfg = load_config(None, [
        f"data.dataset={data}", f"data.cache_dir={tmp_path / 'cache'}",
        f"run.storage={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "optim.batch_size=16", "data.dev_max_images=10", "model.embed_dim=16",
        "model.word_dim=8", "loss.variant=triplet", "negatives.k_captions=60",
        "negatives.k_images=12", "negatives.sampling_range=50", "data.min_word_count=1",
        "run.name=bad", *extra])
    with pytest.raises(DataError) as info:
        run_training(cfg)
    message = str(info.value)
    assert where in message and what in message, message
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()
    run_dir = tmp_path / "runs" / "bad"  # at most its config.yaml, never a checkpoint
    assert {p.name for p in run_dir.iterdir()} <= {"config.yaml"} if run_dir.exists() else True


def test_the_valid_dataset_of_these_cases_is_accepted(tmp_path: Path) -> None:
    """The control: without damage, the same files pass every check."""
    from aoq.data.prepare import prepare_data

    cfg = load_config(None, [f"data.dataset={write_dataset(tmp_path)}",
                             f"data.cache_dir={tmp_path / 'cache'}", "data.min_word_count=1"])
    assert prepare_data(cfg.data, progress=False).splits["train"].n_images == N_TRAIN


def test_out_of_range_values_are_refused_by_the_cli_at_once(tmp_path: Path) -> None:
    """h > K and alpha = 0 in one call (unknown keys and wrong types: test_config.py)."""
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"),
                           f"run.storage={tmp_path}", "negatives.k_captions=100",
                           "negatives.sampling_range=150", "loss.alpha=0"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "negatives.sampling_range=150: must be <= negatives.k_captions=100" in proc.stderr
    assert "loss.alpha=0.0: must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.ray
def test_more_workers_than_the_cluster_has_is_refused_before_any_worker(
        tmp_path: Path, scenes_cache: Path) -> None:
    from conftest import driver_env, small_overrides

    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"),
         *small_overrides(tmp_path, scenes_cache, "run.cpus_per_worker=512", "run.name=huge")],
        capture_output=True, text=True, cwd=tmp_path, env=driver_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "run.num_workers=2 x run.cpus_per_worker=512.0 needs 1024 CPUs, but the Ray " \
           "cluster has" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs" / "huge").glob("checkpoint_*"))
    assert not (tmp_path / "runs" / "huge" / ".validate_storage_marker").exists()


def test_yaml_with_python_tags_or_duplicate_keys_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"evil.yaml, line 1"):
        load_config(evil)
    dup = tmp_path / "dup.yaml"
    dup.write_text("loss:\n  alpha: 0.3\nrun:\n  seed: 1\nloss:\n  beta: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml, line 5: duplicate key 'loss' "
                                          r"\(first set on line 1\)"):
        load_config(dup)
    assert not marker.exists()
