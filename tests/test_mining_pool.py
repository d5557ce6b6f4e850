"""The Ray actor pool that re-mines tables: exact, fault tolerant, never shrinking."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from aoq.cluster.mining_pool import MiningPool, MiningWorker, PoolSpec
from aoq.cluster.refresh import AsyncRefresher
from aoq.config import load_config
from aoq.data.prepare import open_split, prepare_data
from aoq.models import build_model
from aoq.models.encode import encode_split
from aoq.negatives.mining import mine_candidates
from aoq.negatives.tables import list_versions, load_tables

from conftest import small_overrides

pytestmark = [pytest.mark.ray]

EMBED_BATCH = 8  # small enough that 240 images make 24 aligned shards


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, scenes_cache: Path, private_ray):
    tmp = tmp_path_factory.mktemp("pool")
    cfg = load_config(None, small_overrides(tmp, scenes_cache))
    prepared = prepare_data(cfg.data, progress=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim)
    # Single-process mining on the pool's encoder batch grid (EMBED_BATCH images).
    images, captions = encode_split(model, open_split(prepared, "train"),
                                    batch_size=EMBED_BATCH)
    reference = mine_candidates(images, captions, cfg.negatives.k_captions,
                                cfg.negatives.k_images, 5)
    return tmp, cfg, prepared, model, reference


def new_pool(cfg, prepared, actors: int = 2, shards: int = 6, worker=None) -> MiningPool:
    import dataclasses

    return MiningPool(PoolSpec(actors=actors, shards=shards, embed_batch=EMBED_BATCH),
                      prepared, "train", dataclasses.asdict(cfg.model), worker=worker)


def mine_and_shut_down(pool: MiningPool, cfg, model) -> tuple[np.ndarray, np.ndarray]:
    try:
        return pool.mine(model.state_dict(), 1, cfg.negatives.k_captions,
                         cfg.negatives.k_images)
    finally:
        pool.shutdown()


def test_pool_tables_equal_single_process_mining(setup) -> None:
    _, cfg, prepared, model, (i2t, t2i) = setup
    got_i2t, got_t2i = mine_and_shut_down(new_pool(cfg, prepared), cfg, model)
    assert np.array_equal(got_i2t, i2t) and np.array_equal(got_t2i, t2i)


def test_actor_killed_mid_refresh_is_restarted_and_tables_are_identical(setup) -> None:
    tmp, cfg, prepared, model, (i2t, t2i) = setup
    pool = new_pool(cfg, prepared, shards=24)
    refresher = AsyncRefresher(pool, tmp / "kill", cfg.negatives.k_captions,
                               cfg.negatives.k_images)
    try:
        pids = ray.get([a.pid.remote() for a in pool.actors])
        refresher.submit(model.state_dict(), 1, snapshot_epochs=0)
        time.sleep(0.2)
        os.kill(pids[0], signal.SIGKILL)
        result = refresher.poll(wait=True)
        assert result is not None and result.error == "", result
        tables = load_tables(result.path, n_images=prepared.splits["train"].n_images)
        assert np.array_equal(tables.i2t, i2t) and np.array_equal(tables.t2i, t2i)
        # The pool still has two live actors; the killed one came back as a new process.
        assert len(pool) == 2
        new_pids = ray.get([a.pid.remote() for a in pool.actors], timeout=60)
        assert new_pids[0] != pids[0] and new_pids[1] == pids[1]
    finally:
        refresher.close()


def test_permanently_failing_pool_reports_and_keeps_old_tables(setup) -> None:
    tmp, cfg, prepared, model, _ = setup
    pool = new_pool(cfg, prepared)
    root = tmp / "fail"
    refresher = AsyncRefresher(pool, root, cfg.negatives.k_captions, cfg.negatives.k_images)
    try:
        assert refresher.submit(model.state_dict(), 1, snapshot_epochs=0) == 1
        first = refresher.poll(wait=True)
        assert first is not None and first.version == 1 and not first.error
        for actor in pool.actors:  # gone for good: no restart
            ray.kill(actor, no_restart=True)
        assert refresher.submit(model.state_dict(), 2, snapshot_epochs=1) == 2
        failed = refresher.poll(wait=True)
        assert failed is not None and failed.path == "" and "ActorDiedError" in failed.error
        assert list_versions(root) == [1]  # the old version is untouched
    finally:
        refresher.close()


@pytest.mark.parametrize("override, message", [
    ("negatives.pool_gpus=0.5", "negatives.pool_gpus=0.5 needs 1 GPUs"),
    ("negatives.pool_cpus=0.5", "needs 1 CPUs beside the 2 of the training workers"),
])
def test_a_pool_the_cluster_cannot_place_is_refused_before_training(setup, override: str,
                                                                    message: str) -> None:
    from aoq.cluster.job import check_resources
    from aoq.config import ConfigError

    tmp, *_ = setup
    cfg = load_config(None, [f"run.storage={tmp / 'runs'}", "run.num_workers=2",
                             "loss.variant=aoq", "negatives.source=mine", override])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_resources(cfg)


def test_an_application_error_in_a_shard_is_retried(setup) -> None:
    # Defined here so that Ray pickles it by value: tests/ is not importable in workers.
    class FlakyWorker(MiningWorker):
        """Fails its first call of each phase, as a transient memory or CUDA error would."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.failed: set[str] = set()

        def _fail_once(self, phase: str) -> None:
            if phase not in self.failed:
                self.failed.add(phase)
                raise RuntimeError(f"transient failure in {phase}")

        def embed(self, *args, **kwargs):
            self._fail_once("embed")
            return super().embed(*args, **kwargs)

        def topk(self, *args, **kwargs):
            self._fail_once("topk")
            return super().topk(*args, **kwargs)

    _, cfg, prepared, model, (i2t, t2i) = setup
    got_i2t, got_t2i = mine_and_shut_down(new_pool(cfg, prepared, worker=FlakyWorker),
                                          cfg, model)
    assert np.array_equal(got_i2t, i2t) and np.array_equal(got_t2i, t2i)


def test_an_actor_gives_freed_memory_back() -> None:
    # Freed blocks between live ones stay in glibc's heap (nothing at its top to trim);
    # give_back_memory must return their pages. Runs in this process, no Ray needed.
    from aoq.cluster.mining_pool import _libc_malloc_trim, give_back_memory

    if _libc_malloc_trim() is None:
        pytest.skip("the C library is not glibc")

    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf(
            "SC_PAGE_SIZE") / 2**20

    blocks = [np.ones(100_000 // 8) for _ in range(2000)]  # 100 kB each: heap, not mmap
    kept = blocks[::20]
    del blocks
    before = rss_mib()
    give_back_memory()
    assert before - rss_mib() > 100, (before, rss_mib())
    assert all(float(b[0]) == 1.0 for b in kept)
