"""Score a split with one or more saved models and average their score matrices.

The paper's numbers are 2-model ensembles (the mean of two checkpoints' score
matrices), so results carry a label: "single model" or "ensemble of N". Each model's
matrix is computed shard by shard, locally or on an actor pool (one pool per model,
since the actors hold that model's architecture), and accumulated into one running sum,
so memory holds the sum and one shard, not N matrices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from aoq.cluster.job import connect_ray
from aoq.cluster.mining_pool import MiningPool, PoolSpec
from aoq.data.prepare import PreparedData, open_split
from aoq.evaluation.scoring import allocate_scores, n_scored_images, score_split
from aoq.models.base import RetrievalModel
from aoq.models.files import check_fits_data, load_model

log = logging.getLogger("aoq.evaluate")


def ensemble_label(n_models: int) -> str:
    return "single model" if n_models == 1 else f"ensemble of {n_models}"


def _pool_scores(model, record: dict, prepared: PreparedData, split: str, n_images: int,
                 actors: int, threads: int, shard_images: int) -> np.ndarray:
    connect_ray()  # $RAY_ADDRESS inside `ray job submit`, else a private local Ray
    pool = MiningPool(PoolSpec(actors=actors, threads=threads), prepared,
                      split, record["model_config"],
                      name=f"aoq-eval-{os.getpid()}")
    try:
        return pool.score_split(model.state_dict(), split, n_images, shard_images=shard_images)
    finally:
        pool.shutdown()


def _load_fitting(checkpoints: Sequence[str | os.PathLike], prepared: PreparedData
                  ) -> list[tuple[RetrievalModel, dict]]:
    """Every model, each checked against the data, before any scoring starts."""
    loaded = []
    for path in checkpoints:
        model, record = load_model(path)
        check_fits_data(record, path, prepared.signature)
        loaded.append((model, record))
    return loaded


def ensemble_scores(checkpoints: Sequence[str | os.PathLike], prepared: PreparedData,
                    split: str, *, pool_actors: int = 0, pool_threads: int = 1,
                    shard_images: int = 1024, out_path: str | os.PathLike | None = None,
                    ) -> np.ndarray:
    """The mean (n_images, cpi * n_images) score matrix of ``checkpoints`` on ``split``.

    Args:
        pool_actors: score shards on this many Ray actors (0 = in this process).
        out_path: keep the running sum memory-mapped in this ``.npy`` file.

    Raises:
        CheckpointError: a checkpoint is not a model file or was trained for other data
            (checked for every checkpoint before any is scored).
    """
    models = _load_fitting(checkpoints, prepared)
    arrays = open_split(prepared, split)
    n_images = n_scored_images(arrays, 0)
    total = allocate_scores((n_images, arrays.captions_per_image * n_images), out_path)
    total[:] = 0.0
    for index, (path, (model, record)) in enumerate(zip(checkpoints, models), start=1):
        name = record["model_config"].get("name", "?")
        log.info(f"model {index}/{len(checkpoints)}: {name} from {path}")
        if pool_actors > 0:
            scores = _pool_scores(model, record, prepared, split, n_images, pool_actors,
                                  pool_threads, shard_images)
        else:
            def progress(done: int, n: int) -> None:
                log.info(f"model {index}/{len(checkpoints)}: shard {done}/{n}")

            scores = score_split(model, arrays, shard_images=shard_images, progress=progress)
        for start in range(0, n_images, shard_images):  # bounded temporaries
            total[start:start + shard_images] += scores[start:start + shard_images]
        del scores
    total /= len(checkpoints)
    return total


__all__ = ["ensemble_label", "ensemble_scores"]
