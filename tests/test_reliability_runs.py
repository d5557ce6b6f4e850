"""Principle 3: runs are kept apart, in the file system and in the tracking store.

Names are identifiers (refused before Ray starts, through the real command line);
MLflow lookups match exact tag values and never put a user's string into a query; a
user tag cannot replace aoq's own; ``file:`` URIs are URIs. Real SQLite stores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from aoq.cluster.tracking import (
    KIND_TAG, RUN_KEY_TAG, RUN_NAME_TAG, check_store, end_run, resolve_tracking_uri,
    runs_named, start_run,
)
from aoq.config import ConfigError, TrackingConfig, load_config
from aoq.config.names import RESERVED_TAGS
from aoq.storage import run_location

from conftest import small_overrides
from test_reliability_refusals import refusal

pytestmark = pytest.mark.usefixtures("no_ray")

#: A name that, put into an MLflow filter, selects the run named 'victim' instead.
INJECTION = "x' OR tags.`aoq.run_name` = 'victim"


@pytest.mark.parametrize("name, why", [
    ("..", "must be 1-128 characters from A-Z a-z 0-9 . _ -"),
    ("team/exp1", "must be 1-128 characters"),
    ("it's", "must be 1-128 characters"),
    (INJECTION, "must be 1-128 characters"),
    (".hidden", "must be 1-128 characters"),
    ("x" * 129, "must be 1-128 characters"),
    ("studies", "reserved (aoq keeps its Tune studies in <run.storage>/studies)"),
])
def test_run_names_outside_the_identifier_set_are_refused_before_ray(
        name: str, why: str, tmp_path: Path, scenes_cache: Path,
        capsys: pytest.CaptureFixture) -> None:
    """Before: '..' wrote into the parent of run.storage, 'team/exp1' and an apostrophe
    crashed (the latter after Ray had started), a filter clause reopened another run."""
    err = refusal(capsys, "train", small_overrides(tmp_path, scenes_cache, f"run.name={name}"))
    assert f"run.name={name!r}: {why}" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_good_names_pass() -> None:
    for name in ("exp1", "aoq-vse-aoq-20260101-120000", "A.b_c-9", "x" * 128):
        assert load_config(None, [f"run.name={name}"]).run.name == name


def _store(tmp: Path, *extra: str):
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                             f"run.storage={tmp / 'runs'}", *extra])
    return cfg, check_store(cfg.tracking.uri, "aoq"), MlflowClient(cfg.tracking.uri)


def test_a_filter_clause_in_a_name_never_reaches_another_run(tmp_path: Path) -> None:
    """Called below config validation (which already refuses the name): the lookup
    itself must match the exact name, and a job never reopens another finished run."""
    cfg, experiment_id, client = _store(tmp_path)
    victim = start_run(cfg, "victim", {}, resume=True)
    end_run(victim, "FINISHED")
    location = run_location(cfg.run.storage, INJECTION)
    assert runs_named(cfg.tracking.uri, experiment_id, INJECTION, location) == []
    handle = start_run(cfg, INJECTION, {}, resume=True)
    assert handle.run_id != victim.run_id
    run = client.get_run(victim.run_id)
    assert run.info.status == "FINISHED" and "aoq.resumed" not in run.data.tags
    assert client.get_run(handle.run_id).data.tags[RUN_NAME_TAG] == INJECTION


def test_same_name_in_another_storage_is_another_run(tmp_path: Path) -> None:
    cfg, _, client = _store(tmp_path)
    first = start_run(cfg, "exp1", {}, resume=True)
    end_run(first, "FINISHED")
    other = load_config(None, [f"tracking.uri={cfg.tracking.uri}",
                               f"run.storage={tmp_path / 'elsewhere'}"])
    second = start_run(other, "exp1", {}, resume=True)
    assert second.run_id != first.run_id
    assert client.get_run(first.run_id).info.status == "FINISHED"
    again = start_run(cfg, "exp1", {}, resume=True)  # the first job, resumed
    assert again.run_id == first.run_id
    keys = {client.get_run(r).data.tags[RUN_KEY_TAG] for r in (first.run_id, second.run_id)}
    assert len(keys) == 2


def test_a_study_parent_and_a_training_run_of_the_same_name_stay_apart(tmp_path: Path
                                                                       ) -> None:
    from aoq.cluster.tracking import find_run

    cfg, experiment_id, client = _store(tmp_path)
    trained = start_run(cfg, "margins-study", {}, resume=True)  # a user's training run
    assert find_run(cfg.tracking.uri, experiment_id, "margins-study",
                    str(tmp_path / "runs" / "studies" / "margins"), kind="tune-study") is None
    assert client.get_run(trained.run_id).data.tags[KIND_TAG] == "train"


def test_user_tags_cannot_replace_aoq_tags(tmp_path: Path) -> None:
    for key in ("aoq.run_name", "mlflow.runName", "mlflow.parentRunId", *RESERVED_TAGS):
        with pytest.raises(ConfigError, match=rf"tracking.tags.{key}: reserved"):
            load_config(None, [f"tracking.tags.{key}=victim"])
    for key in ("../x", "a//b", "/abs", "x" * 251):
        with pytest.raises(ConfigError, match=r"a tag key is 1-250 characters"):
            load_config(None, [f"tracking.tags.{key}=v"])
    with pytest.raises(ConfigError, match=r"the value has 5001 characters; at most 5000"):
        load_config(None, [f"tracking.tags.note={'v' * 5001}"])
    # Below validation, the run's identity still wins over whatever tags it is given.
    cfg, _, client = _store(tmp_path, "tracking.tags.group=ablation")
    handle = start_run(cfg, "me", {RUN_NAME_TAG: "victim", "mlflow.runName": "victim",
                                   KIND_TAG: "tune-study", "group": "ablation"}, resume=True)
    tags = client.get_run(handle.run_id).data.tags
    assert tags[RUN_NAME_TAG] == tags["mlflow.runName"] == "me" and tags[KIND_TAG] == "train"
    assert tags["group"] == "ablation"


def test_the_job_tags_put_aoq_tags_last(tmp_path: Path, scenes_cache: Path) -> None:
    """The tags a job writes: every one aoq sets is reserved, so a user cannot set it."""
    from aoq.cluster.job import _run_tags
    from aoq.data.prepare import prepare_data

    cfg = load_config(None, small_overrides(tmp_path, scenes_cache, "tracking.tags.team=vision"))
    tags = _run_tags(cfg, prepare_data(cfg.data, progress=False))
    assert tags["team"] == "vision"
    assert set(tags) - {"team"} <= set(RESERVED_TAGS)


def test_a_file_uri_is_a_uri_not_a_relative_path(tmp_path: Path, monkeypatch) -> None:
    """Before: tracking.uri=file:/abs/mlruns made the store <cwd>/file:/abs/mlruns."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "elsewhere" / "mlruns"
    uri = f"file:{store}"
    assert resolve_tracking_uri(TrackingConfig(uri=uri)) == uri
    assert resolve_tracking_uri(TrackingConfig(uri="mlruns")) == str(tmp_path / "mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in
    check_store(resolve_tracking_uri(TrackingConfig(uri=uri)), "aoq")
    assert store.is_dir() and not (tmp_path / "file:").exists()
    # The same holds for run.storage: file:/abs is a URI, not a directory named 'file:'.
    cfg = load_config(None, [f"run.storage=file:{tmp_path / 'runs'}"], base_dir=tmp_path)
    assert cfg.run.storage == f"file:{tmp_path / 'runs'}"
    assert not os.path.exists(tmp_path / "file:")
