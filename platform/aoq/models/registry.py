"""Models by name. Builders are imported lazily so that listing names is cheap."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aoq.config import ModelConfig
    from aoq.models.base import RetrievalModel

# name -> "module:function"; each function is build(cfg, vocab_size, img_dim) -> model.
_BUILDERS: dict[str, str] = {
    "vse": "aoq.models.vse:build_vse",
}


def available_models() -> tuple[str, ...]:
    """Names accepted by ``model.name``."""
    return tuple(sorted(_BUILDERS))


def build_model(cfg: "ModelConfig", vocab_size: int, img_dim: int) -> "RetrievalModel":
    """Instantiate the model named by ``cfg.name``.

    Args:
        cfg: the ``model`` section of the config.
        vocab_size: number of token ids (including the 4 specials).
        img_dim: region feature size of the data (``cfg.img_dim`` must be 0 or equal).
    """
    if cfg.name not in _BUILDERS:
        raise ValueError(f"model.name={cfg.name!r}: must be one of {available_models()}")
    if cfg.img_dim and cfg.img_dim != img_dim:
        raise ValueError(f"model.img_dim={cfg.img_dim} but the data has {img_dim}-d regions")
    module_name, func = _BUILDERS[cfg.name].split(":")
    builder = getattr(importlib.import_module(module_name), func)
    return builder(cfg, vocab_size, img_dim)


def count_parameters(model: "RetrievalModel") -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
