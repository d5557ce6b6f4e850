"""Shared fixtures: a real local Ray instance, and small configs for end-to-end runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Small enough to train in seconds on 2 cores, big enough for every code path
# (two DDP ranks with several steps each, mining with K < n, 1K-style evaluation).
SMALL_SCENES = [
    "data.scenes.n_train=240", "data.scenes.n_dev=40", "data.scenes.n_test=100",
    "data.scenes.feature_dim=32", "data.scenes.n_regions=12",
    "model.embed_dim=32", "model.word_dim=16",
    "optim.batch_size=32", "data.dev_max_images=40",
    "negatives.k_captions=100", "negatives.k_images=40", "negatives.sampling_range=50",
]


@pytest.fixture(scope="session")
def scenes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scenes cache for the session, so small datasets are generated once."""
    return tmp_path_factory.mktemp("scenes-cache")


def small_overrides(tmp: Path, cache: Path, *extra: str) -> list[str]:
    return [*SMALL_SCENES, f"data.cache_dir={cache}", f"run.storage={tmp / 'runs'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private local Ray instance (never attaches to a cluster that happens to run)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, logging_level="WARNING",
             include_dashboard=True)
    yield
    ray.shutdown()
