"""Files on disk under faults (reliability scenarios 5 and 6): no Ray needed.

Atomic writes survive a SIGKILL mid-write, a damaged checkpoint is refused with its path
and the previous complete one is chosen, and a malicious pickle in a checkpoint, model
file or table is refused without running its payload.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aoq.data import DataError
from aoq.negatives.tables import list_versions, load_tables, save_tables
from aoq.models.files import load_model
from aoq.training.checkpoint import (
    STATE_FILE, CheckpointError, capture_rng, load_checkpoint, load_file,
    newest_complete_checkpoint, restore_rng, rng_file, save_file,
)

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Pickles to a call of ``os.system``: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_torch_file(path: Path, marker: Path, **extra) -> None:
    torch.save({"model": {"w": torch.zeros(2)}, "payload": Payload(marker), **extra}, path)
    # Control: an unsafe load really runs the payload, so the refusals below mean something.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def state(epoch: int) -> dict:
    return {"model": {"w": torch.full((3,), float(epoch))}, "optimizer": {}, "scheduler": {},
            "epoch": epoch, "best_rsum": 1.0, "next_table_version": 1}


def write_checkpoint(directory: Path, epoch: int, world: int = 2) -> Path:
    directory.mkdir(parents=True)
    save_file(directory / STATE_FILE, state(epoch))
    for rank in range(world):
        save_file(directory / rng_file(rank), capture_rng())
    return directory


def ray_run_dir(tmp_path: Path, epochs: int) -> list[Path]:
    """A Ray Train run directory as Ray leaves it: a snapshot file, checkpoints by time."""
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    return [write_checkpoint(tmp_path / f"checkpoint_2026-01-01_00-00-0{e}.000000", e)
            for e in range(epochs)]


# ----------------------------------------------------------------------------- scenario 5


def test_a_truncated_checkpoint_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    save_file(path, state(3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{path}: unreadable or unsafe checkpoint"):
        load_file(path)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_file(tmp_path / "nope.pt")


def test_resume_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    first, second, third = ray_run_dir(tmp_path, 3)
    assert newest_complete_checkpoint(first, world=2).state["epoch"] == 2  # newer, complete
    rng = third / rng_file(1)
    rng.write_bytes(rng.read_bytes()[:40])  # one rank's part half written
    chosen = newest_complete_checkpoint(third, world=2)
    assert chosen.path == second and chosen.state["epoch"] == 1
    assert chosen.skipped == ((str(third), chosen.skipped[0][1]),)
    assert str(rng) in chosen.skipped[0][1]
    (second / STATE_FILE).unlink()
    assert newest_complete_checkpoint(third, world=2).path == first
    (first / STATE_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        newest_complete_checkpoint(third, world=2)
    for directory in (first, second, third):
        assert str(directory) in str(info.value)
    # A checkpoint outside a Ray run directory (a download) is taken alone.
    alone = write_checkpoint(tmp_path / "elsewhere" / "ckpt", 7)
    assert newest_complete_checkpoint(alone, world=2).state["epoch"] == 7


def test_a_state_file_without_training_state_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file(directory / STATE_FILE, {"model": {}})
    with pytest.raises(CheckpointError, match=r"not a training state \(missing \['best_rsum'"):
        load_checkpoint(directory, world=1)


def test_rng_states_round_trip_for_torch_numpy_and_python(tmp_path: Path) -> None:
    import random

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_file(tmp_path / "rng.pt", capture_rng())
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(load_file(tmp_path / "rng.pt"))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


WRITER = textwrap.dedent("""
    import sys, numpy as np, torch
    from aoq.negatives.tables import save_tables
    from aoq.training.checkpoint import save_file
    root, ready = sys.argv[1], sys.argv[2]
    big = {"w": torch.arange(4_000_000, dtype=torch.float32)}
    i2t = np.tile(np.arange(5, 405, dtype=np.int64), (400, 1)) % 2000
    t2i = np.zeros((2000, 300), dtype=np.int32) + 7
    version = 1
    while True:
        save_file(f"{root}/state.pt", {**big, "version": version})
        save_tables(f"{root}/tables", version, i2t, t2i)
        if version == 1:
            open(ready, "w").close()
        version += 1
""")


def test_a_writer_killed_mid_write_leaves_whole_files_only(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites a 16 MB checkpoint and publishes table versions in
    a loop: every file a reader finds afterwards is complete."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    for round_ in range(3):
        ready = tmp_path / f"ready{round_}"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(ready)],
                                  env=env)
        try:
            deadline = time.monotonic() + 120
            while not ready.exists():
                assert writer.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.3 + 0.37 * round_)  # land somewhere inside a later write
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
        record = load_file(tmp_path / "state.pt")
        assert record["w"].shape == (4_000_000,) and record["version"] >= 1
        versions = list_versions(tmp_path / "tables")
        assert versions and versions == list(range(1, versions[-1] + 1))
        for version in versions:
            tables = load_tables(tmp_path / "tables" / f"v{version:04d}", n_images=400)
            assert tables.i2t.shape == (400, 400) and tables.version == version
        # The next writer starts its own versions after the ones published.
        for path in (tmp_path / "tables").iterdir():
            if path.name.startswith("v"):
                path.rename(tmp_path / "tables" / f"done-{round_}-{path.name}")


# ----------------------------------------------------------------------------- scenario 6


def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    first, second = ray_run_dir(tmp_path, 2)
    malicious_torch_file(second / STATE_FILE, marker, **{k: v for k, v in state(1).items()
                                                         if k != "model"})
    with pytest.raises(CheckpointError, match=rf"{second / STATE_FILE}: unreadable or unsafe"):
        load_checkpoint(second, world=2)
    # Resuming skips it for the previous complete checkpoint.
    chosen = newest_complete_checkpoint(second, world=2)
    assert chosen.path == first and "unsafe" in chosen.skipped[0][1]
    malicious_torch_file(first / rng_file(1), marker)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        newest_complete_checkpoint(second, world=2)
    assert not marker.exists()


def test_a_malicious_model_file_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "best_model.pt"
    malicious_torch_file(path, marker, model_config={}, vocab_size=10, img_dim=8)
    with pytest.raises(CheckpointError, match="unreadable or unsafe"):
        load_model(path)
    assert not marker.exists()


def test_a_malicious_table_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    i2t = np.arange(20, dtype=np.int64).reshape(2, 10)
    directory = save_tables(tmp_path, 1, i2t, np.zeros((10, 1), dtype=np.int32))
    evil = np.empty((2, 10), dtype=object)
    evil[0, 0] = Payload(marker)
    np.save(directory / "i2t.npy", evil, allow_pickle=True)
    with pytest.raises(DataError, match=r"i2t.npy: unreadable i2t table"):
        load_tables(directory)
    assert not marker.exists()
