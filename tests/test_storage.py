"""run.storage as a URI: a real S3 API (moto's server on loopback) and file:// URIs,
both through pyarrow.fs exactly as on a cluster; and one training job on S3 storage.

moto's server is a local S3 endpoint (HTTP on 127.0.0.1, no network): pyarrow's S3
client talks to it through ``AWS_ENDPOINT_URL`` as it would to AWS, so multipart
uploads, listings and missing buckets behave like an object store (no directories,
no rename), which a ``file://`` URI does not show.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aoq.negatives.tables import list_versions, load_tables, save_tables, version_dir
from aoq.storage import RunStorage, StorageError

from conftest import seed_store, small_overrides, start_ray, store_client

BUCKET = "aoq-runs"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback with one bucket; AWS_* env points pyarrow at it."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                           "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


def _objects(prefix: str) -> set[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _tables(n_images: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 5 * n_images, (n_images, 8)),
            rng.integers(0, n_images, (5 * n_images, 4)))


@pytest.mark.parametrize("scheme", ["s3", "file"])
def test_table_version_round_trip_between_nodes(scheme: str, tmp_path: Path, request) -> None:
    """Node A saves and pushes a version; node B (another cache) pulls and mmaps it."""
    if scheme == "s3":
        request.getfixturevalue("s3_endpoint")
        uri = f"s3://{BUCKET}/rt-{tmp_path.name}"
    else:
        uri = (tmp_path / "store").as_uri()
    node_a = RunStorage(uri, "run1", str(tmp_path / "cache-a"))
    node_b = RunStorage(uri, "run1", str(tmp_path / "cache-b"))
    assert node_a.remote and node_a.location == f"{uri}/run1"
    assert not node_a.exists()
    i2t, t2i = _tables()
    saved = save_tables(node_a.work_dir / "negatives", 1, i2t, t2i, epoch=0)
    node_a.push(saved)
    assert node_a.exists() and node_b.names(node_b.work_dir / "negatives") == ["v0001"]

    target = version_dir(node_b.work_dir / "negatives", 1)
    assert not target.exists()
    assert node_b.pull(target)
    tables = load_tables(target, n_images=20)
    assert isinstance(tables.i2t, np.memmap)
    np.testing.assert_array_equal(tables.i2t, i2t)
    np.testing.assert_array_equal(tables.t2i, t2i)
    assert list_versions(node_b.work_dir / "negatives") == [1]
    # A file that storage lacks is reported missing, not invented.
    assert not node_b.pull(node_b.work_dir / "best_model.pt")
    if scheme == "file":
        stored = sorted(p.name for p in (tmp_path / "store" / "run1" / "negatives" / "v0001")
                        .iterdir())
        assert stored == ["i2t.npy", "meta.json", "t2i.npy"]  # no temp files left behind
    else:
        assert _objects(f"rt-{tmp_path.name}/run1/") == {
            f"rt-{tmp_path.name}/run1/negatives/v0001/{n}"
            for n in ("i2t.npy", "meta.json", "t2i.npy")}


def test_directory_without_marker_is_not_complete(s3_endpoint: str, tmp_path: Path) -> None:
    """A version whose meta.json never arrived (upload cut short) is not picked up."""
    uri = f"s3://{BUCKET}/partial-{tmp_path.name}"
    node_a = RunStorage(uri, "run1", str(tmp_path / "a"))
    saved = save_tables(node_a.work_dir / "negatives", 1, *_tables(), epoch=0)
    node_a._upload_file(saved / "i2t.npy", node_a._remote_path(saved / "i2t.npy"))
    node_b = RunStorage(uri, "run1", str(tmp_path / "b"))
    target = version_dir(node_b.work_dir / "negatives", 1)
    node_b.pull(target)
    assert list_versions(node_b.work_dir / "negatives") == []


def test_unreachable_storage_is_a_clear_error(s3_endpoint: str, tmp_path: Path) -> None:
    storage = RunStorage("s3://no-such-bucket/runs", "run1", str(tmp_path))
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/runs/run1"):
        storage.check()
    with pytest.raises(StorageError, match="run.storage='nosuchscheme://x'"):
        RunStorage("nosuchscheme://x", "run1", str(tmp_path))


def test_plain_path_is_written_in_place(tmp_path: Path) -> None:
    storage = RunStorage(str(tmp_path / "runs"), "run1", str(tmp_path / "cache"))
    assert not storage.remote and storage.work_dir == tmp_path / "runs" / "run1"
    saved = save_tables(storage.work_dir / "negatives", 1, *_tables(), epoch=0)
    storage.push(saved)  # nothing to copy
    assert storage.pull(saved) and not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def ray_with_s3(s3_endpoint: str) -> Iterator[str]:
    """A private local Ray started after the AWS_* variables are set, so its workers
    (child processes of this raylet) reach the same endpoint."""
    import ray

    start_ray()
    yield s3_endpoint
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.e2e
def test_training_job_on_s3_storage(tmp_path: Path, scenes_cache: Path, ray_with_s3: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:

    from aoq.cluster.job import run_training
    from aoq.config import load_config

    monkeypatch.chdir(tmp_path)  # a relative write would land here and be caught below
    prefix = f"e2e-{tmp_path.name}"
    cfg = load_config(None, small_overrides(
        tmp_path, scenes_cache, "optim.epochs=2", "loss.variant=offtri",
        "negatives.warmup_epochs=1", "negatives.pool_actors=1", "run.name=s3run",
        f"run.storage=s3://{BUCKET}/{prefix}", "tracking.experiment=s3"))
    seed_store(tmp_path)
    outcome = run_training(cfg)

    assert outcome.output_dir == f"s3://{BUCKET}/{prefix}/s3run"
    stored = {k.removeprefix(f"{prefix}/s3run/") for k in _objects(f"{prefix}/s3run/")}
    assert {"config.yaml", "best_model.pt", "test_metrics.json", "recall_curves.png",
            "negatives/v0001/meta.json", "negatives/v0001/i2t.npy",
            "negatives/used_rank0.jsonl", "negatives/used_rank1.jsonl",
            "hardness/epoch_002.png"} <= stored
    # Ray Train wrote its checkpoints through the same URI.
    assert any(k.startswith("checkpoint_") and k.endswith("/state.pt") for k in stored)
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "runs").exists()
    import boto3

    body = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"{prefix}/s3run/test_metrics.json")
    assert json.loads(body["Body"].read()) == outcome.test_metrics
    run = store_client(tmp_path).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/rsum"] == pytest.approx(outcome.test_metrics["test/rsum"])
    assert run.data.metrics["negatives/table_version"] == 1
