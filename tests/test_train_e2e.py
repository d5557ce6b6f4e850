"""End to end: a 2-worker Ray Train job on scenes, recorded in a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from ray.util.state import list_actors

from aoq.cluster.trainer import DATASET_ACTOR_CLASS
from aoq.config import load_config

from conftest import train_small

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def test_two_worker_triplet_run_is_recorded(tmp_path: Path, scenes_cache: Path, local_ray) -> None:
    small = train_small(tmp_path, scenes_cache, "optim.epochs=2", "loss.variant=triplet",
                        "run.name=e2e-triplet", "tracking.experiment=e2e")
    cfg, outcome, client = small.cfg, small.outcome, small.client

    out = Path(outcome.output_dir)
    assert out == tmp_path / "runs" / "e2e-triplet"
    for name in ("best_model.pt", "test_metrics.json", "recall_curves.png", "config.yaml"):
        assert (out / name).exists(), name
    test = json.loads((out / "test_metrics.json").read_text())
    assert set(test) >= {"test/rsum", "test/i2t_r1", "test/t2i_r10", "test/i2t_medr"}
    assert outcome.test_metrics == test

    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["loss.variant"] == "triplet" and params["run.num_workers"] == "2"
    assert params["optim.epochs"] == "2" and params["data.scenes.n_train"] == "240"
    tags = run.data.tags
    assert tags["dataset"] == "scenes" and tags["model"] == "vse"
    assert tags["loss_variant"] == "triplet" and tags["git_commit"]
    history = client.get_metric_history(outcome.run_id, "dev/rsum")
    assert [m.step for m in history] == [0, 1]
    losses = client.get_metric_history(outcome.run_id, "train/online_image_anchor")
    assert len(losses) == 2
    assert run.data.metrics["test/rsum"] == pytest.approx(test["test/rsum"])
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "best_model.pt", "recall_curves.png", "test_metrics.json",
            "hardness"} <= artifacts
    assert {a.path for a in client.list_artifacts(outcome.run_id, "hardness")} == {
        "hardness/epoch_001.png", "hardness/epoch_002.png"}
    # The logged config is the one that ran.
    logged = client.download_artifacts(outcome.run_id, "config.yaml", str(tmp_path))
    assert load_config(logged, []) == cfg
    # The Ray checkpoint of the last epoch holds rank 0's state and both ranks' RNG.
    ckpts = sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert ckpts and {"state.pt", "rng_rank0.pt", "rng_rank1.pt"} <= {
        p.name for p in ckpts[-1].iterdir()}
    # aoq passes Ray Train no datasets, so the job started no Ray Data actor, a process
    # that would serve nothing (aoq/cluster/trainer.py). The state API lists finished
    # actors too, so this sees every actor the job started. The address: the other test
    # process runs a Ray instance of its own on this machine.
    classes = {a.class_name for a in list_actors(
        address=ray.get_runtime_context().gcs_address, limit=10_000,
        raise_on_missing_output=False)}
    assert {"TrainController", "RayTrainWorker"} <= classes, classes
    assert DATASET_ACTOR_CLASS not in classes
