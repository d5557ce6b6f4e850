"""Image-text retrieval models, created by name through a small registry.

Importing this package registers every model (each module decorates its class with
``register_model``), which is also what tells config validation the model names.
"""

from aoq.models import bfan, scan, vse, vse_gpo, vsrn  # noqa: F401 - registers the models
from aoq.models.base import RetrievalModel
from aoq.models.registry import (
    available_models, build_model, count_parameters, has_global_embedding, register_model,
)

__all__ = ["RetrievalModel", "available_models", "build_model", "count_parameters",
           "has_global_embedding", "register_model"]
