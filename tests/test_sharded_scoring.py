"""Sharded score matrices: equal to one pass, on disk or in RAM, locally or on the actor
pool, and averaged over checkpoints for ensembles."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from aoq.config import load_config
from aoq.data.prepare import open_split, prepare_data
from aoq.evaluation.scoring import score_split
from aoq.models import build_model

from conftest import SMALL_SCENES

MODELS = ("vse", "vse_gpo", "vsrn", "scan", "bfan")
BATCH = 16  # encoding grid; shards are multiples of it


@pytest.fixture(scope="module")
def prepared(scenes_cache: Path):
    cfg = load_config(None, [*SMALL_SCENES, f"data.cache_dir={scenes_cache}"])
    return cfg, prepare_data(cfg.data, progress=False)


def model_for(cfg, prepared, name: str, seed: int = 0):
    torch.manual_seed(seed)
    model_cfg = dataclasses.replace(cfg.model, name=name, caption_hidden=16, caption_word_dim=8)
    return build_model(model_cfg, prepared.vocab_size, prepared.feature_dim), model_cfg


@pytest.mark.parametrize("name", MODELS)
def test_sharded_scores_equal_one_pass(prepared, name: str, tmp_path: Path) -> None:
    cfg, data = prepared
    model, _ = model_for(cfg, data, name)
    test = open_split(data, "test")
    whole = score_split(model, test, batch_size=BATCH, shard_images=10_000)
    calls = []
    sharded = score_split(model, test, batch_size=BATCH, shard_images=BATCH * 2,
                          out_path=tmp_path / "scores.npy",
                          progress=lambda done, n: calls.append((done, n)))
    assert whole.shape == (100, 500)
    assert isinstance(sharded, np.memmap)
    np.testing.assert_array_equal(np.asarray(sharded), whole)
    assert calls == [(i, 4) for i in range(1, 5)]  # ceil(100 images / 32)
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), whole)
    # A grid-aligned subset of images scores against its own captions only: same numbers.
    np.testing.assert_array_equal(
        score_split(model, test, max_images=48, batch_size=BATCH, shard_images=BATCH),
        whole[:48, :240])


@pytest.mark.ray
def test_pool_scores_equal_local_scores_and_ensembles_average(prepared, local_ray,
                                                               tmp_path: Path) -> None:
    from aoq.cluster.ensemble import ensemble_label, ensemble_scores
    from aoq.cluster.mining_pool import MiningPool, PoolSpec
    from aoq.models.files import model_record, save_file

    cfg, data = prepared
    test = open_split(data, "test")
    paths, singles = [], []
    for seed, name in enumerate(("scan", "vse_gpo")):
        model, model_cfg = model_for(cfg, data, name, seed=seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the pool's actors run one thread each
        try:
            local = score_split(model, test, batch_size=BATCH)
        finally:
            torch.set_num_threads(threads)
        pool = MiningPool(PoolSpec(actors=2, threads=1, embed_batch=BATCH), data, "train",
                          dataclasses.asdict(model_cfg))
        try:
            pooled = pool.score_split(model.state_dict(), "test", test.n_images,
                                      shard_images=BATCH * 2)
        finally:
            pool.shutdown()
        np.testing.assert_allclose(pooled, local, rtol=0, atol=1e-6)
        paths.append(tmp_path / f"{name}.pt")
        save_file(paths[-1], model_record(model_cfg, model, vocab_size=data.vocab_size,
                                          img_dim=data.feature_dim, vocab_path="", epoch=0,
                                          dev_rsum=0.0))
        singles.append(local)
    mean = ensemble_scores(paths, data, "test", shard_images=BATCH * 4,
                           out_path=tmp_path / "ensemble.npy")
    np.testing.assert_allclose(mean, (singles[0] + singles[1]) / 2, rtol=0, atol=1e-5)
    pooled_mean = ensemble_scores(paths, data, "test", pool_actors=2, shard_images=BATCH * 4)
    np.testing.assert_allclose(pooled_mean, mean, rtol=0, atol=1e-5)
    assert ensemble_label(1) == "single model" and ensemble_label(2) == "ensemble of 2"


def test_a_cross_attention_checkpoint_is_refused_as_mining_model(prepared, tmp_path: Path
                                                                 ) -> None:
    from aoq.data import DataError
    from aoq.negatives.checkpoints import mine_from_checkpoint
    from aoq.models.files import model_record, save_file

    cfg, data = prepared
    model, model_cfg = model_for(cfg, data, "bfan")
    path = tmp_path / "bfan.pt"
    save_file(path, model_record(model_cfg, model, vocab_size=data.vocab_size,
                                 img_dim=data.feature_dim, vocab_path="", epoch=0,
                                 dev_rsum=0.0))
    with pytest.raises(DataError, match=r"bfan\.pt.*'bfan' model scores pairs by cross"):
        mine_from_checkpoint(path, open_split(data, "train"), cfg.negatives,
                             vocab_size=data.vocab_size)


def test_evaluate_job_prints_and_writes_a_labelled_ensemble(prepared, scenes_cache: Path,
                                                            tmp_path: Path, capsys) -> None:
    import importlib.util
    import json

    from aoq.evaluation import retrieval_metrics
    from aoq.models.files import model_record, save_file

    cfg, data = prepared
    test = open_split(data, "test")
    paths, singles = [], []
    for seed, name in enumerate(("vse", "bfan")):
        model, model_cfg = model_for(cfg, data, name, seed=seed)
        paths.append(str(tmp_path / f"{name}.pt"))
        save_file(paths[-1], model_record(model_cfg, model, vocab_size=data.vocab_size,
                                          img_dim=data.feature_dim, vocab_path="", epoch=0,
                                          dev_rsum=0.0))
        singles.append(score_split(model, test))
    spec = importlib.util.spec_from_file_location(
        "evaluate_job", Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out_json = tmp_path / "metrics.json"
    data_args = [*SMALL_SCENES, f"data.cache_dir={scenes_cache}"]
    assert job.main([*data_args, "--checkpoint", paths[0], "--checkpoint", paths[1],
                     "--scores-out", str(tmp_path / "scores.npy"), "--shard-images", "32",
                     "--json", str(out_json)]) == 0
    written = json.loads(out_json.read_text())
    assert written["evaluation"] == "ensemble of 2" and written["checkpoints"] == paths
    expected = retrieval_metrics((singles[0] + singles[1]) / 2)
    assert written["rsum"] == pytest.approx(expected["rsum"], abs=1e-6)
    assert "ensemble of 2" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), (singles[0] + singles[1]) / 2,
                               rtol=0, atol=1e-6)
    assert job.main([*data_args, "--checkpoint", paths[0], "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["evaluation"] == "single model"
