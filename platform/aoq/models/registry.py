"""Models by name: each model class registers itself with :func:`register_model`.

Registering also tells config validation the model's name and kind (through
``aoq.config.model_catalog``), so that config never has to import models.
"""

from __future__ import annotations

from collections.abc import Callable

from aoq.config import ModelConfig
from aoq.config.model_catalog import ModelTraits, register_model_traits
from aoq.models.base import RetrievalModel

_MODELS: dict[str, type[RetrievalModel]] = {}


def register_model(name: str) -> Callable[[type[RetrievalModel]], type[RetrievalModel]]:
    """Class decorator: make ``cls`` buildable as ``model.name=<name>``.

    The class is constructed as ``cls(cfg, vocab_size, img_dim)``.
    """

    def register(cls: type[RetrievalModel]) -> type[RetrievalModel]:
        _MODELS[name] = cls
        register_model_traits(ModelTraits(name, bool(cls.has_global_embedding)))
        return cls

    return register


def available_models() -> tuple[str, ...]:
    """Names accepted by ``model.name``."""
    return tuple(sorted(_MODELS))


def model_class(name: str) -> type[RetrievalModel]:
    """The class registered as ``name``."""
    if name not in _MODELS:
        raise ValueError(f"model.name={name!r}: must be one of {available_models()}")
    return _MODELS[name]


def has_global_embedding(name: str) -> bool:
    """Whether model ``name`` embeds each item as one vector (so it can mine tables)."""
    return model_class(name).has_global_embedding


def build_model(cfg: ModelConfig, vocab_size: int, img_dim: int) -> RetrievalModel:
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


def count_parameters(model: RetrievalModel) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
