"""Training state on disk: atomic writes, ``weights_only`` reads, clear errors.

A checkpoint directory holds ``state.pt`` (model, optimizer, scheduler, epoch, best
score, table version, the epoch's metrics; written by rank 0) and ``rng_rank<r>.pt``
(each rank's torch, NumPy and Python RNG states). Everything is plain tensors and Python
scalars, so it loads with ``torch.load(weights_only=True)`` and a checkpoint can never
run code when opened.

A checkpoint counts only when it is *complete*: ``state.pt`` and the RNG file of every
rank load in full. :func:`newest_complete_checkpoint` picks the one to resume from, so a
truncated, half-uploaded or tampered latest checkpoint is skipped for the previous valid
one instead of being partly loaded.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Re-exported: checkpoint files are weights files (tensor-only pickles) too.
from aoq.models.files import CheckpointError, load_file, save_file

__all__ = ["STATE_FILE", "CheckpointError", "LoadedCheckpoint", "capture_rng",
           "checkpoint_candidates", "load_checkpoint", "load_file", "newest_complete_checkpoint",
           "restore_rng", "rng_file", "save_file"]

STATE_FILE = "state.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: torch (CPU, and CUDA when present), NumPy's global
    generator and Python's ``random``, as tensors and scalars (``weights_only``-safe).

    Training draws its randomness from generators seeded by (seed, epoch, rank, step),
    so these states matter only to code that uses the global generators (a DataLoader
    draws its workers' base seed from torch's); they are kept so that such code, too,
    resumes exactly.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng` (older checkpoints without NumPy/Python states work)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        npy = state["numpy"]
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["gauss"]))
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()),
                         py["gauss_next"]))


#: Keys every rank-0 ``state.pt`` has; a file without them is not a training checkpoint.
STATE_KEYS = frozenset({"model", "optimizer", "scheduler", "epoch", "best_rsum",
                        "next_table_version"})


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A complete checkpoint, fully read.

    Attributes:
        path: the checkpoint directory.
        state: rank 0's ``state.pt``.
        rng: every rank's RNG states, by rank.
        skipped: ``(directory, why)`` of newer checkpoints that were not complete.
    """

    path: Path
    state: dict[str, Any]
    rng: dict[int, dict[str, Any]]
    skipped: tuple[tuple[str, str], ...] = ()


def load_checkpoint(directory: str | os.PathLike, world: int) -> LoadedCheckpoint:
    """Read a whole checkpoint directory: ``state.pt`` and the RNG file of each of the
    ``world`` ranks, all with ``weights_only=True``.

    Raises:
        CheckpointError: naming the first file that is missing, truncated or unsafe.
    """
    directory = Path(directory)
    state = load_file(directory / STATE_FILE)
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        missing = sorted(STATE_KEYS - set(state)) if isinstance(state, dict) else "all"
        raise CheckpointError(f"{directory / STATE_FILE}: not a training state "
                              f"(missing {missing})")
    rng = {rank: load_file(directory / rng_file(rank)) for rank in range(world)}
    return LoadedCheckpoint(directory, state, rng)


#: What Ray Train writes beside the checkpoint directories of a run.
_RAY_RUN_MARKER = "checkpoint_manager_snapshot.json"


def checkpoint_candidates(given: str | os.PathLike) -> list[Path]:
    """``given`` and, when it lives in a Ray run directory on local disk, every
    ``checkpoint_*`` directory beside it; newest first (Ray names them by time).

    Siblings newer than ``given`` are complete uploads that Ray had not registered when
    the job or its controller died; older ones are fallbacks.
    """
    given = Path(given)
    parent = given.parent
    if not (parent / _RAY_RUN_MARKER).exists():
        return [given]  # e.g. a temporary download of a checkpoint in remote storage
    found = {p for p in parent.glob("checkpoint_*") if p.is_dir()} | {given}
    return sorted(found, key=lambda p: p.name, reverse=True)


def newest_complete_checkpoint(given: str | os.PathLike, world: int) -> LoadedCheckpoint:
    """The newest checkpoint of :func:`checkpoint_candidates` that loads completely.

    Raises:
        CheckpointError: listing why each candidate was refused, if none is complete.
    """
    skipped: list[tuple[str, str]] = []
    for candidate in checkpoint_candidates(given):
        try:
            loaded = load_checkpoint(candidate, world)
        except CheckpointError as exc:
            skipped.append((str(candidate), str(exc)))
            continue
        return LoadedCheckpoint(loaded.path, loaded.state, loaded.rng, tuple(skipped))
    raise CheckpointError("no complete checkpoint to resume from:\n  - " + "\n  - ".join(
        why for _, why in skipped))
