"""Weights files: tensor-only pickles written atomically and read with ``weights_only``.

A *model record* (``best_model.pt``) is self-describing: the weights plus the model
config and the data sizes it was built for, so a model can be rebuilt without its run.
Everything in it is plain tensors and Python scalars, so it loads with
``torch.load(weights_only=True)`` and opening a file can never run code.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import torch

from aoq.atomic import atomic_write_bytes
from aoq.config import ModelConfig, section_from_dict
from aoq.data.errors import DataError
from aoq.models.base import RetrievalModel
from aoq.models.registry import build_model

#: Keys every model record has.
RECORD_KEYS = frozenset({"model", "model_config", "vocab_size", "img_dim"})


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


def model_record(model_cfg: ModelConfig, core: torch.nn.Module, *, vocab_size: int,
                 img_dim: int, **extra: Any) -> dict[str, Any]:
    """A self-describing weights file: enough to rebuild the model without its run.

    Args:
        model_cfg: the ``model`` config section (stored as a dict).
        core: the model (not a DDP wrapper).
        vocab_size, img_dim: the data sizes it was built for.
        extra: more plain values to store (epoch, dev rsum, vocabulary path ...).
    """
    return {
        "model": core.state_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "vocab_size": vocab_size,
        "img_dim": img_dim,
        **extra,
    }


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> tuple[RetrievalModel, dict[str, Any]]:
    """Rebuild a model from a :func:`model_record` file.

    Returns:
        (model in eval mode, the record without its weights).

    Raises:
        CheckpointError: naming the file, when it is not a loadable model record.
    """
    record = load_file(path, map_location)
    missing = RECORD_KEYS - set(record)
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


def load_model_for(path: str | os.PathLike, *, vocab_size: int, img_dim: int,
                   map_location: str | torch.device = "cpu"
                   ) -> tuple[RetrievalModel, dict[str, Any]]:
    """:func:`load_model`, refusing a model built for other data.

    Raises:
        DataError: naming the file, when its vocabulary or region size differs from the
            data's (``vocab_size``, ``img_dim``).
    """
    model, record = load_model(path, map_location)
    if int(record["vocab_size"]) != vocab_size or int(record["img_dim"]) != img_dim:
        raise DataError(
            f"checkpoint was trained with vocab {record['vocab_size']} / {record['img_dim']}-d "
            f"regions, the data has vocab {vocab_size} / {img_dim}-d", path=path)
    return model, record
