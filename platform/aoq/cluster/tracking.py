"""MLflow tracking: one run per training job, created and closed by the driver.

The driver creates the store (SQLite stores created by several processes at once get
corrupted), the experiment (with an absolute artifact location, since a submitted Ray
job runs in a temporary directory), and the run. Rank 0 of the training workers logs
per-epoch metrics into that run by id; the driver logs final metrics and artifacts and
sets the final status.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aoq.config import Config, TrackingConfig, dump_yaml, flatten

RUN_NAME_TAG = "aoq.run_name"


def resolve_tracking_uri(cfg: TrackingConfig, base: Path | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``;
    a relative SQLite path is made absolute against ``base`` (default: cwd)."""
    base = Path.cwd() if base is None else base
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            uri = f"sqlite:///{(base / path).resolve()}"
    elif "://" not in uri:
        # A bare path means a local file store; make it absolute too.
        uri = str((base / uri).resolve())
    return uri


def default_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go in ``mlartifacts/`` beside the database file."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def git_commit() -> str:
    """The commit of the aoq source tree, or 'unknown' outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@dataclass(frozen=True)
class RunHandle:
    """What a worker needs to log into the driver's run."""

    tracking_uri: str
    run_id: str
    experiment_id: str


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, creating the store and experiment if needed."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_root(uri))
    except Exception:  # noqa: BLE001 - lost a creation race: the experiment now exists
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(uri: str, experiment_id: str, run_name: str) -> Any | None:
    """The newest run of this experiment tagged with ``run_name``, if any."""
    runs = _client(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0] if runs else None


def start_run(cfg: Config, run_name: str, tags: dict[str, str], *, resume: bool) -> RunHandle:
    """Create the job's run (or reopen the one of a resumed job) and log the config.

    Params are logged only for a new run: MLflow refuses to change a logged param, and a
    resumed job has the same config by construction.
    """
    uri = resolve_tracking_uri(cfg.tracking)
    experiment_id = ensure_experiment(uri, cfg.tracking.experiment)
    client = _client(uri)
    existing = find_run(uri, experiment_id, run_name) if resume else None
    if existing is not None:
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "aoq.resumed", "true")
        return RunHandle(uri, run_id, experiment_id)
    all_tags = {RUN_NAME_TAG: run_name, "mlflow.runName": run_name, **tags}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flatten(cfg).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start:start + 100])
    client.log_text(run_id, dump_yaml(cfg), "config.yaml")
    return RunHandle(uri, run_id, experiment_id)


def log_metrics(handle: RunHandle, metrics: dict[str, float], step: int) -> None:
    """Log numeric metrics at ``step`` (non-numbers are skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k.replace("@", "_at_"), float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for start in range(0, len(items), 1000):
        _client(handle.tracking_uri).log_batch(handle.run_id, metrics=items[start:start + 1000])


def log_artifact(handle: RunHandle, path: str | os.PathLike, artifact_path: str | None = None
                 ) -> None:
    _client(handle.tracking_uri).log_artifact(handle.run_id, str(path), artifact_path)


def set_tags(handle: RunHandle, tags: dict[str, str]) -> None:
    client = _client(handle.tracking_uri)
    for k, v in tags.items():
        client.set_tag(handle.run_id, k, v)


def end_run(handle: RunHandle, status: str) -> None:
    """Set the final status: FINISHED, FAILED or KILLED."""
    _client(handle.tracking_uri).set_terminated(handle.run_id, status=status)
