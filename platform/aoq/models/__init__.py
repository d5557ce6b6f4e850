"""Image-text retrieval models, created by name through a small registry."""

from aoq.models.base import RetrievalModel
from aoq.models.registry import available_models, build_model, count_parameters

__all__ = ["RetrievalModel", "available_models", "build_model", "count_parameters"]
