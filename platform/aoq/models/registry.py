"""Models by name. Classes are imported lazily so that listing names is cheap."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aoq.config import ModelConfig
    from aoq.models.base import RetrievalModel

# name -> "module:Class"; each class is constructed as Class(cfg, vocab_size, img_dim).
_MODELS: dict[str, str] = {
    "vse": "aoq.models.vse:VSE",
    "vse_gpo": "aoq.models.vse_gpo:VSEGPO",
    "vsrn": "aoq.models.vsrn:VSRN",
    "scan": "aoq.models.scan:SCAN",
    "bfan": "aoq.models.bfan:BFAN",
}


def available_models() -> tuple[str, ...]:
    """Names accepted by ``model.name``."""
    return tuple(sorted(_MODELS))


def model_class(name: str) -> "type[RetrievalModel]":
    """The class registered as ``name`` (imports its module)."""
    if name not in _MODELS:
        raise ValueError(f"model.name={name!r}: must be one of {available_models()}")
    module_name, cls = _MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), cls)


def has_global_embedding(name: str) -> bool:
    """Whether model ``name`` embeds each item as one vector (so it can mine tables)."""
    return model_class(name).has_global_embedding


def build_model(cfg: "ModelConfig", vocab_size: int, img_dim: int) -> "RetrievalModel":
    """Instantiate the model named by ``cfg.name``.

    Args:
        cfg: the ``model`` section of the config.
        vocab_size: number of token ids (including the 4 specials).
        img_dim: region feature size of the data (``cfg.img_dim`` must be 0 or equal).
    """
    cls = model_class(cfg.name)
    if cfg.img_dim and cfg.img_dim != img_dim:
        raise ValueError(f"model.img_dim={cfg.img_dim} but the data has {img_dim}-d regions")
    return cls(cfg, vocab_size, img_dim)


def count_parameters(model: "RetrievalModel") -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
