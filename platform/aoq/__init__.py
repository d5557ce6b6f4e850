"""aoq: Adaptive Offline Quintuplet loss for image-text matching.

The pure-PyTorch pieces live in ``aoq.config``, ``aoq.data``, ``aoq.models``,
``aoq.losses``, ``aoq.negatives``, ``aoq.evaluation`` and ``aoq.training``; only
``aoq.cluster`` imports Ray or MLflow.
"""

__version__ = "0.1.0"
