"""Weights files: tensor-only pickles written atomically and read with ``weights_only``.

A *model record* (``best_model.pt``) is self-describing: the weights plus the model
config and the data it was built for, so a model can be rebuilt without its run.
Everything in it is plain tensors and Python scalars, so it loads with
``torch.load(weights_only=True)`` and opening a file can never run code.

The data a record fits is its vocabulary (size and fingerprint of the words in order:
the same words in another order give other embeddings for every id) and the shape of an
image's features (regions x dimension). :func:`check_fits_data` refuses a record for
other data, naming both sides. Records written before the fingerprint was stored load
if their sizes match; their words are checked against the vocabulary file they name
if it still exists, and otherwise they load with a warning (the sizes are all there is
to compare).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from aoq.atomic import atomic_write_bytes
from aoq.config import ModelConfig, section_from_dict
from aoq.config.validation import model_problems
from aoq.data.errors import DataError
from aoq.data.prepare import DataSignature
from aoq.data.text import Vocabulary
from aoq.models.base import RetrievalModel
from aoq.models.registry import build_model

log = logging.getLogger("aoq.models")

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
                 img_dim: int, vocab_fingerprint: str = "", n_regions: int = 0,
                 **extra: Any) -> dict[str, Any]:
    """A self-describing weights file: enough to rebuild the model without its run.

    Args:
        model_cfg: the ``model`` config section (stored as a dict).
        core: the model (not a DDP wrapper).
        vocab_size, img_dim: the data sizes it was built for.
        vocab_fingerprint, n_regions: the rest of the data it fits (see
            :class:`aoq.data.prepare.DataSignature`); stored when given.
        extra: more plain values to store (epoch, dev rsum, vocabulary path ...).
    """
    fits = {"vocab_fingerprint": vocab_fingerprint} if vocab_fingerprint else {}
    if n_regions:
        fits["n_regions"] = n_regions
    return {
        "model": core.state_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "vocab_size": vocab_size,
        "img_dim": img_dim,
        **fits,
        **extra,
    }


def _record_problem(record: Any) -> str | None:
    """What makes ``record`` not a model record (None if it is one)."""
    if not isinstance(record, dict):
        return f"not a model file (holds a {type(record).__name__})"
    missing = RECORD_KEYS - set(record)
    if missing:
        return f"not a model file (missing {sorted(missing)})"
    if not isinstance(record["model_config"], dict) or not isinstance(record["model"], dict):
        return "not a model file (model_config and model must be mappings)"
    for key, low in (("vocab_size", 4), ("img_dim", 1), ("n_regions", 1)):
        value = record.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"stored {key}={value!r} is not an integer >= {low}"
    if not isinstance(record.get("vocab_fingerprint", ""), str):
        return "stored vocab_fingerprint is not a string"
    return None


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> tuple[RetrievalModel, dict[str, Any]]:
    """Rebuild a model from a :func:`model_record` file.

    Returns:
        (model in eval mode, the record without its weights).

    Raises:
        CheckpointError: naming the file, when it is not a loadable model record.
    """
    record = load_file(path, map_location)
    problem = _record_problem(record)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        cfg = section_from_dict(ModelConfig, record["model_config"], prefix="model.")
    except ValueError as exc:
        raise CheckpointError(f"{path}: stored model config is invalid ({exc})") from None
    problems = model_problems(cfg)
    if problems:
        raise CheckpointError(f"{path}: stored model config is invalid: {'; '.join(problems)}")
    try:
        model = build_model(cfg, record["vocab_size"], record["img_dim"])
        model.load_state_dict(record["model"])
    except (RuntimeError, ValueError) as exc:
        text = " ".join(str(exc).split())[:500]
        raise CheckpointError(f"{path}: weights do not match the model ({text})") from None
    model.eval()
    return model, {k: v for k, v in record.items() if k != "model"}


def _stored_fingerprint(record: dict[str, Any], path: str | os.PathLike) -> str | None:
    """The record's vocabulary fingerprint; for a record written before it was stored,
    that of the vocabulary file it names, if that file still exists (else None)."""
    if record.get("vocab_fingerprint"):
        return record["vocab_fingerprint"]
    vocab_path = record.get("vocab_path")
    if isinstance(vocab_path, str) and vocab_path and os.path.isfile(vocab_path):
        try:
            return Vocabulary.load(vocab_path).fingerprint()
        except DataError:
            pass
    log.warning(f"{path}: written without a vocabulary fingerprint and its vocabulary file "
                "is gone; only the vocabulary size can be checked against the data")
    return None


def check_fits_data(record: dict[str, Any], path: str | os.PathLike, data: DataSignature
                    ) -> None:
    """Refuse a model record for other data than ``data``, naming both.

    Raises:
        CheckpointError: the vocabulary (size, or the words and their order) or the
            feature shape differs.
    """
    ours = (f"the data has a {data.vocab_size}-word vocabulary (fingerprint "
            f"{data.vocab_fingerprint or 'unknown'}) and {data.n_regions} x "
            f"{data.feature_dim} features per image")
    regions = record.get("n_regions")
    if record["img_dim"] != data.feature_dim or (regions and regions != data.n_regions):
        shape = f"{regions} x {record['img_dim']}" if regions else f"{record['img_dim']}-d"
        raise CheckpointError(f"{path}: trained on {shape} features per image, but {ours}")
    if record["vocab_size"] != data.vocab_size:
        raise CheckpointError(f"{path}: trained with a {record['vocab_size']}-word "
                              f"vocabulary, but {ours}")
    stored = _stored_fingerprint(record, path)
    if stored and data.vocab_fingerprint and stored != data.vocab_fingerprint:
        raise CheckpointError(
            f"{path}: trained with vocabulary fingerprint {stored}, but {ours}: the same "
            "number of words, not the same words in the same order (every word id would "
            "mean another word)")


def load_model_for(path: str | os.PathLike, data: DataSignature,
                   map_location: str | torch.device = "cpu"
                   ) -> tuple[RetrievalModel, dict[str, Any]]:
    """:func:`load_model`, refusing a model built for other data (:func:`check_fits_data`)."""
    model, record = load_model(path, map_location)
    check_fits_data(record, path, data)
    return model, record
