"""The TorchTrainer a job runs: Ray Train's, without the Ray Data actor aoq never uses.

For every run, Ray Train (2.60) starts a ``DatasetManager`` actor that serves shards of
the Ray Datasets passed to the trainer, and sends every worker a copy of the driver's
Ray Data context. aoq passes no Ray Datasets: workers read their split from the
prepared files (``aoq.data``), so that actor is a process per job that imports Ray
Train and Ray Data, holds memory until the run ends, and serves nothing. With no
datasets, :class:`JobTrainer` leaves out the callback that starts it; everything else
Ray Train installs (placement-group cleanup, worker setup, metrics, user callbacks) is
kept. ``tests/test_train_e2e.py`` checks, on a real run, that no such actor
starts, so a Ray upgrade that renames the hook fails there rather than silently
bringing the actor back.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

#: Ray Train's name for the actor class :class:`JobTrainer` avoids starting.
DATASET_ACTOR_CLASS = "DatasetManager"


class JobTrainer(TorchTrainer):
    """A ``TorchTrainer`` that starts no Ray Data actor when it is given no datasets."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
