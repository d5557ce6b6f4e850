"""Training state on disk: atomic writes, ``weights_only`` reads, clear errors.

A checkpoint directory holds ``state.pt`` (model, optimizer, scheduler, epoch, best
score, table version; written by rank 0) and ``rng_rank<r>.pt`` (each rank's torch RNG
state). Everything is plain tensors and Python scalars, so it loads with
``torch.load(weights_only=True)`` and a checkpoint can never run code when opened.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from aoq.atomic import atomic_write_bytes

STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, or not a safe tensor-only pickle."""


def save_file(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to memory, then an atomic replace of ``path``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``; anything else raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(
            f"{path}: unreadable or unsafe checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def capture_rng() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and CUDA when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def model_record(model_cfg: Any, core: torch.nn.Module, *, vocab_size: int, img_dim: int,
                 **extra: Any) -> dict[str, Any]:
    """A self-describing weights file: enough to rebuild the model without its run.

    Args:
        model_cfg: the ``model`` config section (a dataclass; stored as a dict).
    """
    import dataclasses

    return {
        "model": core.state_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "vocab_size": vocab_size,
        "img_dim": img_dim,
        **extra,
    }


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild a model from a :func:`model_record` file.

    Returns:
        (model in eval mode, the record without its weights).
    """
    from aoq.config import ModelConfig, section_from_dict
    from aoq.models import build_model

    record = load_file(path, map_location)
    missing = {"model", "model_config", "vocab_size", "img_dim"} - set(record)
    if missing:
        raise CheckpointError(f"{path}: not a model file (missing {sorted(missing)})")
    try:
        cfg = section_from_dict(ModelConfig, record["model_config"], prefix="model.")
    except ValueError as exc:
        raise CheckpointError(f"{path}: stored model config is invalid ({exc})") from None
    model = build_model(cfg, int(record["vocab_size"]), int(record["img_dim"]))
    try:
        model.load_state_dict(record["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model ({exc})") from None
    model.eval()
    return model, {k: v for k, v in record.items() if k != "model"}
