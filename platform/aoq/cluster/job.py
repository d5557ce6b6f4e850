"""The driver of one training job: check everything, then run a TorchTrainer.

Order matters: config and data are validated and the candidate tables a run starts
with are settled *before* Ray starts or any worker launches, so bad input fails in
seconds with a message naming the file or key; the MLflow run is created before the
trainer so a crash is still recorded (as FAILED).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import (
    CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig,
    TrainingFailedError,
)
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

from aoq.atomic import atomic_write_text
from aoq.cluster.console import after_ray_init, before_ray_init
from aoq.cluster.interrupts import signal_label, stop_signals, stopped_by
from aoq.cluster.trainer import JobTrainer
from aoq.cluster.tracking import (
    RunHandle, check_store, end_run, git_commit, local_store_path, log_artifact,
    resolve_tracking_uri, set_tags, start_run, ui_link,
)
from aoq.cluster.train_loop import WorkerPayload, train_loop_per_worker
from aoq.config import BUILT_IN_DATASETS, Config, ConfigError, dump_yaml, parse_negative_source
from aoq.config.paths import check_paths
from aoq.data.prepare import PreparedData, open_split, prepare_data
from aoq.inspection.gallery import GALLERY_FILE, gallery_for_checkpoint, write_gallery
from aoq.inspection.hard_negatives import last_used_version
from aoq.models.files import CheckpointError, check_fits_data, load_file
from aoq.negatives.checkpoints import mine_from_checkpoint
from aoq.negatives.schedule import mines_during_training, uses_offline
from aoq.negatives.tables import load_tables, save_tables, version_dir
from aoq.storage import RunStorage, is_uri
from aoq.training.run_files import (
    BEST_MODEL_FILE, CONFIG_FILE, RECALL_PLOT_FILE, TEST_METRICS_FILE, tables_root,
    used_versions_file,
)


@dataclass(frozen=True)
class TrainingOutcome:
    """What a finished job produced."""

    run_name: str
    run_id: str
    output_dir: str
    test_metrics: dict[str, float]
    seconds: float


class TrainingFailed(RuntimeError):
    """Training failed on every attempt the failure budget allowed."""


def default_run_name(cfg: Config) -> str:
    return f"aoq-{cfg.model.name}-{cfg.loss.variant}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_model_against_data(cfg: Config, prepared: PreparedData) -> None:
    """The model options that must agree with the data, checked before any worker
    builds the model (where a mismatch would first show as a worker's traceback)."""
    if cfg.model.img_dim and cfg.model.img_dim != prepared.feature_dim:
        raise ConfigError(f"model.img_dim={cfg.model.img_dim}: the data's region features "
                          f"have {prepared.feature_dim} dimensions (0 infers it)")


def check_resumed_run(cfg: Config, run_name: str, storage: RunStorage,
                      prepared: PreparedData) -> None:
    """A resumed run continues the weights it has: refuse, before any worker loads them,
    a job whose model or data they were not trained for (its best weights record both).

    Raises:
        CheckpointError: naming the weights file, what they were trained for and what
            this job has.
    """
    best = storage.work_dir / BEST_MODEL_FILE
    if not cfg.run.resume or not storage.pull(best):
        return
    record = load_file(best)
    if not isinstance(record, dict) or not isinstance(record.get("model_config"), dict):
        raise CheckpointError(f"{best}: not a model file")
    stored, current = record["model_config"], dataclasses.asdict(cfg.model)
    changed = [f"model.{k}={stored[k]!r} there, {v!r} here" for k, v in current.items()
               if k in stored and stored[k] != v]
    if changed:
        raise CheckpointError(f"{best}: run.name={run_name!r} exists with another model "
                              f"({'; '.join(changed)}); choose another run.name")
    check_fits_data(record, best, prepared.signature)


def check_config_against_data(cfg: Config, prepared: PreparedData) -> None:
    """The checks that need the data's sizes; raise ConfigError before any worker starts."""
    train = prepared.splits[cfg.data.train_split]
    test = prepared.splits[cfg.data.test_split]
    cpi = prepared.captions_per_image
    problems = []
    if uses_offline(cfg.loss):
        if cfg.negatives.k_captions > cpi * (train.n_images - 1):
            problems.append(f"negatives.k_captions={cfg.negatives.k_captions}: the training split "
                            f"has only {cpi * (train.n_images - 1)} non-positive captions per "
                            "image")
        if cfg.negatives.k_images > train.n_images - 1:
            problems.append(f"negatives.k_images={cfg.negatives.k_images}: the training split "
                            f"has only {train.n_images - 1} other images")
    if test.n_images % cfg.data.test_folds:
        problems.append(f"data.test_folds={cfg.data.test_folds}: must divide the "
                        f"{test.n_images} test images")
    pairs = cpi * train.n_images
    if cfg.optim.batch_scope == "global" and pairs < cfg.optim.batch_size:
        problems.append(f"optim.batch_size={cfg.optim.batch_size}: the training split has "
                        f"only {pairs} pairs, less than one global batch")
    per_rank = pairs // cfg.run.num_workers
    if cfg.optim.batch_scope == "worker" and per_rank < cfg.optim.batch_size:
        problems.append(f"optim.batch_size={cfg.optim.batch_size}: each of the "
                        f"{cfg.run.num_workers} workers sees only {per_rank} pairs per epoch")
    if problems:
        raise ConfigError("config does not fit the data:\n  - " + "\n  - ".join(problems))


#: Set by Ray's job supervisor in the environment of a submitted job's driver.
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_outputs_outlive_job(cfg: Config, cwd: Path | None = None) -> None:
    """Refuse, in a job started by ``ray job submit``, outputs inside its working dir.

    Ray runs a submitted job in a temporary copy of ``--working-dir`` and deletes it
    afterwards; a relative ``run.storage`` or SQLite tracking path (the defaults are
    both relative) was made absolute against that copy and would vanish with it.
    """
    if not os.environ.get(SUBMITTED_JOB_ENV):
        return
    cwd = (cwd or Path.cwd()).resolve()
    places = {"run.storage": "" if is_uri(cfg.run.storage) else cfg.run.storage}
    store = local_store_path(resolve_tracking_uri(cfg.tracking))
    places["tracking.uri"] = str(store) if store else ""
    inside = [f"{key}={value}" for key, value in places.items()
              if value and Path(value).resolve().is_relative_to(cwd)]
    if inside:
        raise ConfigError(
            f"{', '.join(inside)}: inside the submitted job's temporary working directory "
            f"{cwd}, which Ray deletes when the job ends; give an absolute path on shared "
            "storage or a URI (run.storage=s3://..., tracking.uri=http://... or "
            "MLFLOW_TRACKING_URI)")


def initial_tables(cfg: Config, prepared: PreparedData, storage: RunStorage) -> str | None:
    """The table version a run starts with, checked or produced on the driver.

    ``tables:<path>`` is loaded and every id checked against the training split;
    ``checkpoint:<path>`` mines once from that first-round model (the paper's procedure)
    into the run's own table directory (pushed to storage), unless a resumed run
    already did.
    """
    if not uses_offline(cfg.loss):
        return None
    kind, path = parse_negative_source(cfg.negatives.source)
    if kind == "mine":
        return None
    train = prepared.splits[cfg.data.train_split]
    if kind == "tables":
        tables = load_tables(path, n_images=train.n_images,
                             captions_per_image=prepared.captions_per_image)
        if tables.i2t.shape[1] < cfg.negatives.sampling_range:
            raise ConfigError(f"negatives.sampling_range={cfg.negatives.sampling_range}: the "
                              f"tables at {tables.path} have only {tables.i2t.shape[1]} columns")
        return tables.path
    root = tables_root(storage.work_dir)
    if storage.pull(version_dir(root, 1)):
        return str(version_dir(root, 1))
    i2t, t2i, meta = mine_from_checkpoint(path, open_split(prepared, cfg.data.train_split),
                                          cfg.negatives, vocab_size=prepared.vocab_size,
                                          vocab_fingerprint=prepared.vocab_fingerprint,
                                          progress=True)
    saved = save_tables(root, 1, i2t, t2i, **meta)
    storage.push(saved)
    return str(saved)


#: Environment for the processes of a Ray instance the driver starts itself (they
#: inherit the driver's; a cluster's nodes keep their own). One machine has no
#: autoscaler to drain it, so Ray Train's preemption watcher, one more actor process
#: (~100 MiB PSS) polling every 5 s, has nothing to watch (docs/benchmarks.md §8).
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def connect_ray() -> bool:
    """Connect to ``$RAY_ADDRESS`` (e.g. inside ``ray job submit``) or start a local Ray.

    Returns True if this call started a local instance (then resources are known).
    """
    if ray.is_initialized():
        return False
    before_ray_init()
    started = not os.environ.get("RAY_ADDRESS")
    if started:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)  # a value the user set wins
    # The dashboard stays on (loopback only): Ray Train's placement-group cleaner asks
    # its state API every second whether the controller lives, and logs each failure.
    ray.init(**({"address": "local"} if started else {}), logging_level="WARNING")
    after_ray_init()
    return started


def check_resources(cfg: Config, total: dict[str, float] | None = None) -> None:
    """Refuse a worker group the cluster can never place, instead of waiting forever.

    ``total``: the cluster's resources (default: asked from Ray)."""
    total = ray.cluster_resources() if total is None else total
    need_cpu = cfg.run.num_workers * cfg.run.cpus_per_worker
    if total.get("CPU", 0) + 1e-9 < need_cpu:
        raise ConfigError(
            f"run.num_workers={cfg.run.num_workers} x run.cpus_per_worker="
            f"{cfg.run.cpus_per_worker} needs {need_cpu:g} CPUs, but the Ray cluster has "
            f"{total.get('CPU', 0):g}")
    if cfg.run.device == "cuda" and total.get("GPU", 0) < cfg.run.num_workers:
        raise ConfigError(f"run.device='cuda' needs {cfg.run.num_workers} GPUs, but the Ray "
                          f"cluster has {total.get('GPU', 0):g}")
    neg = cfg.negatives
    if neg.pool_actors and mines_during_training(neg, cfg.loss):
        # The pool is placed after the trainers; an unplaceable actor would leave the
        # first mining (which training waits for) pending forever.
        train_gpus = cfg.run.num_workers if use_gpu(cfg, total) else 0
        for kind, per_actor, used in (("CPU", neg.pool_cpus, need_cpu),
                                      ("GPU", neg.pool_gpus, train_gpus)):
            need = neg.pool_actors * per_actor
            if need and total.get(kind, 0) + 1e-9 < used + need:
                raise ConfigError(
                    f"negatives.pool_actors={neg.pool_actors} x negatives.pool_"
                    f"{kind.lower()}s={per_actor:g} needs {need:g} {kind}s beside the "
                    f"{used:g} of the training workers, but the Ray cluster has "
                    f"{total.get(kind, 0):g}")


def use_gpu(cfg: Config, total: dict[str, float] | None = None) -> bool:
    if cfg.run.device == "cpu":
        return False
    if cfg.run.device == "cuda":
        return True
    total = ray.cluster_resources() if total is None else total
    return total.get("GPU", 0) >= cfg.run.num_workers


#: Read by Ray Train's controller (propagated from the driver's environment).
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def bound_worker_group_start(cfg: Config) -> None:
    """How long Ray Train waits for a worker group to be placed before it tries again
    (``run.start_timeout_s``); the number of tries is ``FailureConfig``'s
    ``controller_failure_limit`` (``run.start_retries``)."""
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = f"{cfg.run.start_timeout_s:g}"


def build_trainer(cfg: Config, payload: WorkerPayload, run_name: str,
                  callbacks: Sequence[Any] = ()):
    """A TorchTrainer for this job (gloo on CPU, NCCL with one GPU per worker; no Ray
    Data actor, ``aoq.cluster.trainer``); ``callbacks`` are Ray Train callbacks (a Tune
    trial passes TuneReportCallback)."""
    gpu = use_gpu(cfg)
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    bound_worker_group_start(cfg)
    return JobTrainer(
        train_loop_per_worker,
        train_loop_config={"payload": payload},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.run.storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            # A worker group that cannot be placed is a controller failure, retried
            # without limit by default: bounded by run.start_retries.
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         controller_failure_limit=cfg.run.start_retries),
            callbacks=list(callbacks),
        ),
    )


def _run_tags(cfg: Config, prepared: PreparedData) -> dict[str, str]:
    dataset = (cfg.data.dataset if cfg.data.dataset in BUILT_IN_DATASETS
               else Path(prepared.directory).name)
    return {
        **cfg.tracking.tags,  # first: aoq's own tags below win (validation refuses them)
        "dataset": dataset,
        "model": cfg.model.name,
        "loss_variant": cfg.loss.variant,
        "git_commit": git_commit(),
        "evaluation": "single model",
    }


def _log_outputs(handle: RunHandle, storage: RunStorage) -> None:
    """Log the run's final files; rank 0 may have written them on another node."""
    for name in (BEST_MODEL_FILE, TEST_METRICS_FILE, RECALL_PLOT_FILE):
        path = storage.work_dir / name
        if storage.pull(path):
            log_artifact(handle, path)


def _log_gallery(cfg: Config, prepared: PreparedData, handle: RunHandle,
                 storage: RunStorage) -> None:
    """Write and log the run's retrieval gallery (``aoq.inspection.gallery``). The run
    has finished by then: a failure here is a warning and a tag, never a failed run."""
    run_dir = storage.work_dir
    try:
        storage.pull(used_versions_file(run_dir, 0))
        used = last_used_version(run_dir)
        if used and parse_negative_source(cfg.negatives.source)[0] != "tables":
            storage.pull(version_dir(tables_root(run_dir), used))
        html = gallery_for_checkpoint(run_dir / BEST_MODEL_FILE, cfg, prepared, run_dir=run_dir)
        path = write_gallery(run_dir / GALLERY_FILE, html)
        storage.push(path)
        log_artifact(handle, path)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the model is trained
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]
        print(f"[aoq] warning: no retrieval gallery for this run ({why})", file=sys.stderr,
              flush=True)
        set_tags(handle, {"aoq.warning.gallery": why})


def run_training(cfg: Config, *, tags: dict[str, str] | None = None,
                 callbacks: Sequence[Any] = (), record_failure: bool = True
                 ) -> TrainingOutcome:
    """Train, evaluate and record one job; returns the final test metrics.

    ``tags`` are added to the MLflow run (a Tune trial adds its parent run and study);
    ``callbacks`` go to the TorchTrainer. With ``record_failure=False`` an exception
    leaves the run's status to the caller: a Tune trial stopped early by its scheduler
    ends in an exception too, and only the study driver knows which it was.

    Raises:
        ConfigError / DataError / CheckpointError / StorageError: before Ray starts, for
            bad config, data, checkpoints or storage.
        Terminated / Interrupted: SIGTERM or Ctrl-C (the MLflow run is marked KILLED).
        Exception: the training failure (the MLflow run is marked FAILED first).
    """
    start = time.perf_counter()
    check_outputs_outlive_job(cfg)
    check_paths(cfg)
    prepared = prepare_data(cfg.data, progress=True)
    check_config_against_data(cfg, prepared)
    check_model_against_data(cfg, prepared)
    run_name = cfg.run.name or default_run_name(cfg)
    storage = RunStorage(cfg.run.storage, run_name, cfg.data.cache_dir)
    storage.check()
    if storage.exists() and not cfg.run.resume:
        raise ConfigError(f"run.name={run_name!r}: {storage.location} already exists; choose "
                          "another name or set run.resume=true to continue it")
    check_resumed_run(cfg, run_name, storage, prepared)
    output_dir = storage.work_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / CONFIG_FILE, dump_yaml(cfg))
    storage.push(output_dir / CONFIG_FILE)
    tables = initial_tables(cfg, prepared, storage)
    # Before Ray: an unreachable or read-only store fails here, in seconds.
    check_store(resolve_tracking_uri(cfg.tracking), cfg.tracking.experiment)
    started_local = connect_ray()
    if started_local:
        check_resources(cfg)
    with stop_signals() as signals:
        handle = start_run(cfg, run_name, {**(tags or {}), **_run_tags(cfg, prepared)},
                           resume=cfg.run.resume)
        print(f"[aoq] run {run_name!r}: MLflow run {handle.run_id} at {handle.tracking_uri}; "
              f"in the MLflow UI: {ui_link(handle)}", flush=True)
        payload = WorkerPayload(config=cfg, prepared=prepared, run=handle,
                                output_dir=str(output_dir), initial_tables=tables)
        try:
            test_metrics = _fit(cfg, payload, run_name, callbacks, storage)
            _log_outputs(handle, storage)
            _log_gallery(cfg, prepared, handle, storage)
        except BaseException:
            # A signal may arrive as our exception, as Ray's SystemExit(1), or through
            # Ray Train's own SIGINT handler: ask which signal came, not what was raised.
            signum = signals.received()
            if record_failure:
                end_run(handle, "FAILED" if signum is None else "KILLED")
            if signum is None:
                raise
            print(f"[aoq] run {run_name!r} stopped by {signal_label(signum)}; MLflow run "
                  f"{handle.run_id} marked KILLED; to continue from its last checkpoint, run "
                  f"the same command again with run.name={run_name}", file=sys.stderr,
                  flush=True)
            raise stopped_by(signum) from None
        end_run(handle, "FINISHED")
    return TrainingOutcome(run_name, handle.run_id, storage.location, test_metrics,
                           time.perf_counter() - start)


def _fit(cfg: Config, payload: WorkerPayload, run_name: str, callbacks: Sequence[Any],
         storage: RunStorage) -> dict[str, float]:
    """Run the trainer; returns the test metrics rank 0 wrote.

    Raises:
        TrainingFailed: when training failed on all ``run.max_failures + 1`` attempts
            (Ray restarts the worker group from the latest checkpoint after each).
    """
    try:
        result = build_trainer(cfg, payload, run_name, callbacks).fit()
        if getattr(result, "error", None) is not None:
            raise result.error
    except TrainingFailedError as exc:
        if isinstance(exc, ControllerError) and \
                isinstance(exc.controller_failure, WorkerGroupStartupTimeoutError):
            raise TrainingFailed(_never_started(cfg, run_name, exc)) from exc
        attempts = cfg.run.max_failures + 1
        cause = " ".join(str(exc).split())[:1500]
        restarts = (f"; each restart continued from the latest checkpoint in {storage.location}"
                    if attempts > 1 else "")
        raise TrainingFailed(
            f"run {run_name!r}: training failed on all {attempts} attempt(s) allowed by "
            f"run.max_failures={cfg.run.max_failures}{restarts}. Last error: {cause}") from exc
    # Rank 0 may have written the file on another node.
    storage.pull(storage.work_dir / TEST_METRICS_FILE)
    return json.loads((storage.work_dir / TEST_METRICS_FILE).read_text())



def _never_started(cfg: Config, run_name: str, exc: Exception) -> str:
    """Why a job whose worker group was never placed failed (after run.start_retries)."""
    cause = " ".join(str(exc).split())[:600]
    gpu = ", 1 GPU" if use_gpu(cfg) else ""
    return (f"run {run_name!r}: the worker group ({cfg.run.num_workers} workers x "
            f"{cfg.run.cpus_per_worker:g} CPUs{gpu} each) could not be placed in "
            f"{cfg.run.start_retries + 1} tries of run.start_timeout_s="
            f"{cfg.run.start_timeout_s:g}s (run.start_retries={cfg.run.start_retries}); the "
            f"cluster lacks these resources or they are taken. Ray: {cause}")
