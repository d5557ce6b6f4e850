"""What config validation knows about models: their names and kinds.

Config sits below models, so it cannot import them. Instead every model registers its
traits here when ``aoq.models`` is imported (see ``aoq.models.registry.register_model``),
and validation reads this catalog. Entry points (``aoq.cli``, the cluster driver) import
``aoq.models`` before they load a config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelTraits:
    """The facts about a model that config validation needs.

    Attributes:
        name: the value of ``model.name`` that selects it.
        global_embedding: True when it embeds each item as one vector (so it can mine
            the whole training set by dot products); False for cross-attention models.
    """

    name: str
    global_embedding: bool


_CATALOG: dict[str, ModelTraits] = {}


def register_model_traits(traits: ModelTraits) -> None:
    """Record (or replace) the traits of one model."""
    _CATALOG[traits.name] = traits


def known_models() -> tuple[str, ...]:
    """Registered model names, sorted."""
    return tuple(sorted(_CATALOG))


def model_traits(name: str) -> ModelTraits | None:
    """The traits of model ``name``, or None when no such model is registered."""
    return _CATALOG.get(name)
