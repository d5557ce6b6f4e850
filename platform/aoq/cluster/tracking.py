"""MLflow tracking: one run per training job, created and closed by the driver.

The driver creates the store (SQLite stores created by several processes at once get
corrupted), the experiment (with an absolute artifact location, since a submitted Ray
job runs in a temporary directory), and the run. Rank 0 of the training workers logs
per-epoch metrics into that run by id; the driver logs final metrics and artifacts and
sets the final status.

Failure handling: HTTP requests to a tracking server have bounded retries and timeouts
(:func:`bound_http_requests`), and :func:`check_store` proves the store reachable and
writable before Ray starts, so an unreachable server or a read-only store is a clear
error in seconds, not a hang or a crash mid-training. A resumed job reopens its run and
closes other RUNNING runs of the same name that no live process owns.

Runs are kept apart: a run is found again by its kind and the location of its outputs
(``run.storage``/``run.name``), hashed into the tag :data:`RUN_KEY_TAG`, and lookups
compare tag values exactly; no lookup is built from a user's string (a hex digest is
the only value ever placed in a filter). aoq's own tags are written after the user's,
so a user tag can never replace them (config validation refuses such tags anyway).

A fresh SQLite store is created and its schema migrated once, under a file lock beside
the database: MLflow's migration, run by two processes at once, fails half-way
(``duplicate column name``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from aoq.config import Config, ConfigError, TrackingConfig, dump_yaml, flatten
from aoq.storage import run_location

RUN_NAME_TAG = "aoq.run_name"
#: MLflow's mark of an experiment that trains models (not GenAI traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: Where ``mlflow ui`` listens by default (README: bound to 127.0.0.1).
DEFAULT_UI = "http://127.0.0.1:5000"
#: ``host:pid:process start time`` of the driver that last opened the run.
DRIVER_TAG = "aoq.driver"
#: What a run is: ``train`` (a training job or Tune trial), ``tune-study`` (a study's
#: parent run), ``ablation-summary``.
KIND_TAG = "aoq.kind"
#: sha256 of the run's kind and output location: what a resumed job finds its run by.
RUN_KEY_TAG = "aoq.run_key"
#: How long a process waits for another one creating the same SQLite store.
STORE_LOCK_TIMEOUT_S = 300.0
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
_HEX = re.compile(r"[0-9a-f]{64}")

#: MLflow's HTTP defaults (7 retries with backoff factor 2, 120 s timeout) let one call
#: to a dead server block for minutes; these bound it to well under a minute when the
#: server refuses connections and about two minutes when it never answers.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(ConfigError):
    """The tracking store cannot be used (unreachable, read-only, or not a store)."""


def bound_http_requests() -> None:
    """Apply :data:`HTTP_BOUNDS` where the user has not set them (MLflow reads them at
    every request). Called by the driver and by every training worker."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def resolve_tracking_uri(cfg: TrackingConfig, base: Path | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``;
    a relative SQLite path is made absolute against ``base`` (default: cwd)."""
    base = Path.cwd() if base is None else base
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            uri = f"sqlite:///{(base / path).resolve()}"
    elif not _URI_SCHEME.match(uri):
        # A bare path means a local file store; make it absolute too. Anything with a
        # scheme (file:/abs/mlruns, http://...) is a URI and left to MLflow.
        uri = str((base / uri).resolve())
    return uri


def local_store_path(uri: str) -> Path | None:
    """The local file or directory a store URI writes to (SQLite file, ``file:`` or bare
    path), or None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        rest = uri[len("file:"):]
        return Path("/" + rest.lstrip("/")) if rest.startswith("/") else Path(rest)
    return None if _URI_SCHEME.match(uri) else Path(uri)


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


#: SQLite stores this process has created or found migrated (MLflow then caches them).
_READY_STORES: set[str] = set()


def _client(uri: str):
    """An MlflowClient; a SQLite store is created (or migrated) once, under a lock."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and uri not in _READY_STORES:
        with _store_lock(uri):
            # Constructing the client may already open (create, migrate) the store.
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        _READY_STORES.add(uri)
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold ``<db>.lock`` while MLflow opens a SQLite store: whoever comes second finds
    the schema complete. In a read-only directory nobody can create the store, so
    there is no race and no lock (opening it is what check_store reports on)."""
    lock_path = f"{uri[len('sqlite:///'):]}.lock"
    try:
        lock = FileLock(lock_path, timeout=STORE_LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise TrackingError(f"tracking.uri={uri!r}: another process has held {lock_path} "
                            f"for {STORE_LOCK_TIMEOUT_S:.0f}s while creating the store"
                            ) from None
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, creating the store and experiment if needed."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_root(uri),
                                        tags=EXPERIMENT_KIND)
    except Exception:  # noqa: BLE001 - lost a creation race: the experiment now exists
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ui_link(handle: RunHandle) -> str:
    """The link that opens the run's experiment on its training runs in the MLflow UI.

    MLflow 3.17's UI picks an experiment's view from its GenAI / Model training switch
    (the ``workflowType`` URL parameter, else the browser's last choice, else GenAI: an
    empty trace overview), not from the experiment's kind tag, so the link carries the
    parameter. A tracking server is its own UI; a local store is read by ``mlflow ui``.
    """
    base = handle.tracking_uri if handle.tracking_uri.startswith(("http://", "https://")) \
        else DEFAULT_UI
    return (f"{base.rstrip('/')}/#/experiments/{handle.experiment_id}/runs/{handle.run_id}"
            "?workflowType=machine_learning")


def check_store(uri: str, experiment: str) -> str:
    """Prove the store usable before anything expensive starts: reach it, create the
    experiment if needed, and write one experiment tag.

    Returns:
        The experiment id.

    Raises:
        TrackingError: naming ``tracking.uri`` and what is wrong.
    """
    bound_http_requests()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise TrackingError(f"tracking.uri={uri!r}: directory {path.parent} does not exist")
        # SQLite needs the file and, for its journal, the directory writable.
        for what, target in (("store file", path), ("directory", path.parent)):
            if target.exists() and not os.access(target, os.W_OK):
                raise TrackingError(f"tracking.uri={uri!r}: the store is read-only ({what} "
                                    f"{target} is not writable)")
    start = time.monotonic()
    try:
        experiment_id = ensure_experiment(uri, experiment)
        _client(uri).set_experiment_tag(experiment_id, "aoq.last_checked",
                                        time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and requests errors
        text = " ".join(str(exc).split())
        if "readonly" in text.lower() or "read-only" in text.lower():
            what = "the store is read-only"
        elif uri.startswith(("http://", "https://")):
            what = f"the tracking server is unreachable (gave up after " \
                   f"{time.monotonic() - start:.0f}s)"
        else:
            what = "the store cannot be opened or written"
        raise TrackingError(f"tracking.uri={uri!r}: {what}: {type(exc).__name__}: "
                            f"{text[:500]}") from None
    return experiment_id


def run_key(kind: str, location: str) -> str:
    """The :data:`RUN_KEY_TAG` value of the run of ``kind`` whose outputs are at
    ``location`` (a training run: ``aoq.storage.run_location(run.storage, run.name)``;
    a study's parent: the study's directory)."""
    return hashlib.sha256(f"{kind}\n{location}".encode("utf-8")).hexdigest()


def find_run(uri: str, experiment_id: str, run_name: str, location: str,
             kind: str = "train") -> Any | None:
    """The newest run of this experiment named ``run_name`` of ``kind`` at ``location``."""
    runs = runs_named(uri, experiment_id, run_name, location, kind)
    return runs[0] if runs else None


def _search_all(uri: str, experiment_id: str, filter_string: str) -> list[Any]:
    """Every run of the experiment matching a fixed filter, page by page."""
    client, runs, token = _client(uri), [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def runs_named(uri: str, experiment_id: str, run_name: str, location: str,
               kind: str = "train") -> list[Any]:
    """Every run of this experiment named ``run_name`` of ``kind`` at ``location``,
    newest first, compared by exact tag values.

    Runs recorded before run keys existed have none; they are matched by their name
    alone, as they were then (a resumed job gives the run it reopens its key). Neither
    query holds a user's string: one holds a hex digest, the other no value at all.
    """
    key = run_key(kind, location)
    if not _HEX.fullmatch(key):
        raise AssertionError(f"run key {key!r} is not a sha256 hex digest")
    keyed = _search_all(uri, experiment_id, f"tags.`{RUN_KEY_TAG}` = '{key}'")
    legacy = _search_all(uri, experiment_id, f"tags.`{RUN_KEY_TAG}` IS NULL AND "
                                             f"tags.`{RUN_NAME_TAG}` IS NOT NULL")
    runs = [r for r in keyed if r.data.tags.get(RUN_KEY_TAG) == key]
    runs += [r for r in legacy if RUN_KEY_TAG not in r.data.tags
             and r.data.tags.get(KIND_TAG, "train") == kind]
    runs = [r for r in runs if r.data.tags.get(RUN_NAME_TAG) == run_name]
    return sorted(runs, key=lambda r: r.info.start_time, reverse=True)


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None if it
    does not exist or this is not Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, after the command name


def driver_identity(pid: int | None = None) -> str:
    """``host:pid:start`` of process ``pid`` (default: this one), for :data:`DRIVER_TAG`."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def _owner_alive(tag: str | None) -> bool:
    """Whether the driver named by a :data:`DRIVER_TAG` value is another live process on
    this host (a pid alone could have been reused: its start time must match too)."""
    try:
        host, pid, started = (tag or "").rsplit(":", 2)
        if host != socket.gethostname() or int(pid) == os.getpid():
            return False
    except ValueError:
        return False
    return started != "None" and _process_start(int(pid)) == started


def reopen_run(uri: str, experiment_id: str, run_name: str, location: str) -> str | None:
    """For a resumed job: reopen the newest run named ``run_name`` at ``location`` and
    mark the older ones that are still RUNNING (left by killed drivers) KILLED.

    Raises:
        TrackingError: if the newest run is RUNNING under a driver that is still alive
            (two jobs must not train into one run and one directory).
    """
    runs = runs_named(uri, experiment_id, run_name, location)
    if not runs:
        return None
    client = _client(uri)
    newest, older = runs[0], runs[1:]
    owner = newest.data.tags.get(DRIVER_TAG)
    if newest.info.status == "RUNNING" and _owner_alive(owner):
        raise TrackingError(f"run.name={run_name!r}: MLflow run {newest.info.run_id} is "
                            f"still being trained by the live process {owner}; stop it "
                            "or choose another run.name")
    for run in older:
        if run.info.status == "RUNNING" and not _owner_alive(run.data.tags.get(DRIVER_TAG)):
            client.set_terminated(run.info.run_id, status="KILLED")
            client.set_tag(run.info.run_id, "aoq.closed_as_stale", "true")
    run_id = newest.info.run_id
    client.set_tag(run_id, RUN_KEY_TAG, run_key("train", location))
    if newest.info.status == "RUNNING":
        # Its driver died without closing it (SIGKILL, lost node): say so.
        client.set_tag(run_id, "aoq.recovered_stale_run", "true")
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "aoq.resumed", "true")
    client.set_tag(run_id, DRIVER_TAG, driver_identity())
    return run_id


def start_run(cfg: Config, run_name: str, tags: dict[str, str], *, resume: bool) -> RunHandle:
    """Create the job's run (or reopen the one of a resumed job) and log the config.

    Params are logged only for a new run: MLflow refuses to change a logged param, and a
    resumed job has the same config by construction. The run's identity tags are
    written last, so no tag in ``tags`` can replace them.
    """
    uri = resolve_tracking_uri(cfg.tracking)
    experiment_id = ensure_experiment(uri, cfg.tracking.experiment)
    client = _client(uri)
    location = run_location(cfg.run.storage, run_name)
    run_id = reopen_run(uri, experiment_id, run_name, location) if resume else None
    if run_id is not None:
        return RunHandle(uri, run_id, experiment_id)
    all_tags = {**tags, RUN_NAME_TAG: run_name, "mlflow.runName": run_name,
                KIND_TAG: "train", RUN_KEY_TAG: run_key("train", location),
                DRIVER_TAG: driver_identity()}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flatten(cfg).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start:start + 100])
    client.log_text(run_id, dump_yaml(cfg), "config.yaml")
    return RunHandle(uri, run_id, experiment_id)


def logged_steps(handle: RunHandle, key: str) -> set[int]:
    """The steps at which metric ``key`` has been logged in this run."""
    return {m.step for m in _client(handle.tracking_uri).get_metric_history(handle.run_id, key)}


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
