"""Ray Tune studies: every trial is a full distributed training job, nested in MLflow.

Train V2 cannot hand a ``TorchTrainer`` to ``tune.Tuner``; following Ray's
``train_tune_interop`` pattern, each trial is a function that builds the trial's config
from the sampled values and calls :func:`run_training`, whose trainer forwards every
epoch's report to Tune (``TuneReportCallback``). The trial function itself reserves
no CPU (its trainer's workers do), and ``max_concurrent_trials`` bounds the trials so
that trials plus their workers always fit: checked before the study starts.

MLflow: one parent run per study, one child run per trial (``mlflow.parentRunId``), each
child found again by its run-name tag, so a resumed study reopens the same child runs
instead of opening second ones. After Tune returns, children that Tune stopped (ASHA)
or that died with a killed driver are closed with the right status: none stays RUNNING.

Nothing a trial produced is dropped: ASHA's decision at a trial's last epoch waits for
the trial's final report (:class:`LastEpochASHA`), which comes after its test
evaluation, and the driver takes each trial's test metrics and outputs from the trial's
own directory when Tune's record of the trial lacks them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator

from aoq.atomic import atomic_write_text
from aoq.cluster.interrupts import signal_label, stop_signals, stopped_by
from aoq.cluster.job import (
    check_config_against_data, check_model_against_data, check_resources, connect_ray,
    run_training,
)
from aoq.cluster.tracking import (
    KIND_TAG, RUN_KEY_TAG, RUN_NAME_TAG, RunHandle, end_run, ensure_experiment, find_run,
    log_artifact, log_metrics, resolve_tracking_uri, run_key,
)
from aoq.config import Config, ConfigError, dump_yaml, load_config, parse_negative_source
from aoq.config.names import name_problem
from aoq.config.paths import check_paths
from aoq.config.tune_space import (
    ParamSpec, TuneSpace, as_overrides, describe_point, load_space, probe_points,
)
from aoq.data.prepare import PreparedData, open_split, prepare_data
from aoq.negatives.checkpoints import mine_from_checkpoint
from aoq.negatives.schedule import mines_during_training, uses_offline
from aoq.negatives.tables import list_versions, load_tables, save_tables, version_dir
from aoq.storage import run_location
from aoq.training.run_files import BEST_MODEL_FILE, RECALL_PLOT_FILE, TEST_METRICS_FILE

STUDY_FILE = "study.json"
#: A study file holds a few settings; anything far larger is not one.
MAX_STUDY_FILE_BYTES = 1 << 16
#: The epoch at which ASHA judged each trial weak (written by :class:`LastEpochASHA`).
DECISIONS_FILE = "scheduler_stops.json"
STUDY_KIND_TAG = KIND_TAG
STUDY_TAG = "study"
STOPPED_EARLY_TAG = "aoq.tune.stopped_early"
TRIAL_MEMORY_BYTES = 256 * 1024**2  # the trial's driver function; its workers are apart


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """Everything that defines a study; saved in its directory so ``--resume`` needs
    only the name.

    Attributes:
        name: the study's name (directory, MLflow tag ``study``, run-name prefix).
        space: path of the search-space YAML.
        config: optional base config YAML; overrides: dotted overrides on top of it.
        samples: trials to sample (for grid spaces: repeats of the grid).
        scheduler: ``asha`` (early stopping on the space's metric) or ``fifo``.
        max_concurrent: trials running at once (0 = as many as the cluster fits).
        trial_cpus: CPUs reserved by each trial's driver function (its workers are
            reserved separately by its trainer).
        seed: seed of the sampler.
    """

    name: str
    space: str
    config: str | None = None
    overrides: tuple[str, ...] = ()
    samples: int = 4
    scheduler: str = "asha"
    max_concurrent: int = 0
    trial_cpus: float = 0.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """What every trial function needs (sent once through the object store)."""

    study: str
    config: str | None
    overrides: tuple[str, ...]
    keys: tuple[str, ...]
    trials_dir: str
    parent_run_id: str


@dataclasses.dataclass(frozen=True)
class StudyOutcome:
    study_dir: str
    parent_run_id: str
    table: pd.DataFrame
    best_config_path: str


def study_dir(cfg: Config, name: str) -> Path:
    """``<run.storage>/studies/<name>``; the name is an identifier, so it stays there."""
    problem = name_problem("study name", name)
    if problem:
        raise ConfigError(problem)
    return Path(cfg.run.storage) / "studies" / name


#: StudySpec field -> (types it may have in study.json, low, high) for numbers.
_SPEC_FIELDS: dict[str, tuple[tuple[type, ...], float | None, float | None]] = {
    "name": ((str,), None, None), "space": ((str,), None, None),
    "config": ((str, type(None)), None, None), "overrides": ((list, tuple), None, None),
    "samples": ((int,), 1, 100_000), "scheduler": ((str,), None, None),
    "max_concurrent": ((int,), 0, 10_000), "trial_cpus": ((int, float), 0, 1024),
    "seed": ((int,), 0, 2**32 - 1),
}


def spec_problems(values: dict[str, Any]) -> list[str]:
    """Every problem of a study's settings (as given, or as read from study.json)."""
    problems = []
    missing = set(_SPEC_FIELDS) - set(values)
    unknown = set(values) - set(_SPEC_FIELDS)
    if missing or unknown:
        return [f"missing {sorted(missing)}, unknown {sorted(unknown)}"]
    for key, (types, low, high) in _SPEC_FIELDS.items():
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, types):
            problems.append(f"{key}={value!r}: expected {' or '.join(t.__name__ for t in types)}")
        elif low is not None and not low <= value <= high:
            problems.append(f"{key}={value!r}: must be in {low}..{high}")
    if not problems:
        problems += [p for p in [name_problem("name", values["name"])] if p]
        if values["scheduler"] not in ("asha", "fifo"):
            problems.append(f"scheduler={values['scheduler']!r}: use asha or fifo")
        if not all(isinstance(o, str) for o in values["overrides"]):
            problems.append("overrides: expected a list of KEY=VALUE strings")
    return problems


def save_spec(spec: StudySpec, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / STUDY_FILE, json.dumps(dataclasses.asdict(spec), indent=2))


def load_spec(directory: Path) -> StudySpec:
    """The settings of the study in ``directory``, checked as a new study's are.

    Raises:
        ConfigError: naming study.json and what is wrong with it.
    """
    path = directory / STUDY_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no study to resume here (was it started with this "
                          "run.storage?)")
    try:
        if path.stat().st_size > MAX_STUDY_FILE_BYTES:
            raise ConfigError(f"{path}: larger than a study file can be "
                              f"({MAX_STUDY_FILE_BYTES} bytes)")
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: unreadable study file ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not a complete study file ({exc.msg}, line {exc.lineno}); "
                          "it is written whole by the study that created it, so it was "
                          "changed since") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: not a study file (expected a JSON object)")
    problems = spec_problems(values)
    if problems:
        raise ConfigError(f"{path}: not a valid study file: {'; '.join(problems)}")
    values["overrides"] = tuple(values["overrides"])
    return StudySpec(**values)


# --------------------------------------------------------------------------- checks


def per_trial_cpus(cfg: Config, trial_cpus: float) -> float:
    """CPUs one trial holds: its driver function, its workers, its mining actors."""
    need = trial_cpus + cfg.run.num_workers * cfg.run.cpus_per_worker
    if cfg.negatives.pool_actors and mines_during_training(cfg.negatives, cfg.loss):
        need += cfg.negatives.pool_actors * cfg.negatives.pool_cpus
    return need


def concurrency(cfg: Config, spec: StudySpec, cluster_cpus: float) -> int:
    """How many trials may run at once; refuses a study that would deadlock.

    A trial whose workers cannot be placed waits forever while holding its own slot, so
    ``concurrent x per-trial CPUs`` must fit the cluster. ``cfg`` is the config of the
    most demanding trial the space can sample (:func:`check_every_trial`).
    """
    need = per_trial_cpus(cfg, spec.trial_cpus)
    fits = math.floor((cluster_cpus + 1e-9) / need) if need > 0 else spec.samples
    if fits < 1:
        raise ConfigError(
            f"one trial needs {need:g} CPUs (trial_cpus={spec.trial_cpus:g} + "
            f"run.num_workers={cfg.run.num_workers} x run.cpus_per_worker="
            f"{cfg.run.cpus_per_worker:g} + mining actors), but the Ray cluster has "
            f"{cluster_cpus:g}")
    if spec.max_concurrent > fits:
        raise ConfigError(
            f"--max-concurrent {spec.max_concurrent} trials x {need:g} CPUs each needs "
            f"{spec.max_concurrent * need:g} CPUs, but the Ray cluster has "
            f"{cluster_cpus:g}: trials would wait forever for their workers. Use "
            f"--max-concurrent {fits} or fewer.")
    return spec.max_concurrent or fits


def check_every_trial(spec: StudySpec, space: TuneSpace, base_config: str,
                      overrides: tuple[str, ...], prepared: PreparedData,
                      total: dict[str, float]) -> Config:
    """Check every combination of extreme values a trial can sample: it must be a valid
    config, fit the data and fit the cluster on its own (a trial that cannot be placed
    would retry its worker group until it gives up). Returns the config of the most
    demanding one in CPUs, for :func:`concurrency`.

    Raises:
        ConfigError: naming the space file and the sampled values that do not fit.
    """
    worst: tuple[float, Config] | None = None
    for sampled, cfg in probe_points(space, base_config, overrides):
        try:
            check_config_against_data(cfg, prepared)
            check_model_against_data(cfg, prepared)
            check_resources(cfg, total)
        except ConfigError as exc:
            raise ConfigError(f"{space.path}: a trial could sample "
                              f"{describe_point(sampled)}: {exc}") from None
        need = per_trial_cpus(cfg, spec.trial_cpus)
        if worst is None or need > worst[0]:
            worst = (need, cfg)
    assert worst is not None  # a space has at least one parameter
    return worst[1]


# --------------------------------------------------------------------------- Tune glue


def tune_distribution(p: ParamSpec) -> Any:
    if p.distribution == "grid":
        return tune.grid_search(list(p.values))
    if p.distribution == "choice":
        return tune.choice(list(p.values))
    if p.distribution in ("randint", "qrandint"):
        low, high = int(p.low), int(p.high)
        return tune.randint(low, high) if p.q is None else tune.qrandint(low, high, int(p.q))
    fn = {"uniform": tune.uniform, "loguniform": tune.loguniform,
          "quniform": tune.quniform, "qloguniform": tune.qloguniform}[p.distribution]
    return fn(p.low, p.high) if p.q is None else fn(p.low, p.high, p.q)


def trial_name(study: str, trial_id: str) -> str:
    return f"{study}-{trial_id}"


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: the sampled values on top of the study's config, trained to the end
    (or until the scheduler stops it), reporting every epoch to Tune."""
    trial_id = tune.get_context().get_trial_id()
    name = trial_name(ctx.study, trial_id)
    sampled = {k: config[k] for k in ctx.keys}
    cfg = load_config(ctx.config, [*ctx.overrides, *as_overrides(sampled),
                                   f"run.name={name}", f"run.storage={ctx.trials_dir}",
                                   "run.resume=true"])
    tags = {"mlflow.parentRunId": ctx.parent_run_id, STUDY_TAG: ctx.study,
            "aoq.tune.trial_id": trial_id,
            **{f"aoq.tune.param.{k}": str(v) for k, v in sampled.items()}}
    # The driver sets the final status of a failed or stopped trial (close_trial_runs).
    run_training(cfg, tags=tags, callbacks=[TuneReportCallback()], record_failure=False)


class LastEpochASHA(ASHAScheduler):
    """ASHA on the epoch axis that never stops a trial in its last epoch.

    When epochs - 1 is one of ASHA's rungs (epochs = 2, 3, 5, 9 ...), stopping a trial
    at its last epoch's report saves no training and loses what comes after it: the
    test evaluation and the trial's outputs. Here that decision is taken on the trial's
    final report instead (which carries the same dev metrics, after the test
    evaluation), where it can no longer cut anything; ASHA still records the trial at
    that rung for the trials that come after it. Every STOP verdict is written to
    ``decisions`` (trial id -> epoch), so the summary can say which trials ASHA judged
    weak even when the verdict stopped nothing.
    """

    def __init__(self, *, epochs: int, decisions: str, **kwargs: Any) -> None:
        super().__init__(time_attr="epoch", max_t=epochs, **kwargs)
        self._last_epoch = epochs - 1
        self._decisions = decisions

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        final = bool(result.get("final"))
        if not final and result.get("epoch", -1) >= self._last_epoch:
            return TrialScheduler.CONTINUE  # decided on the final report
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self._record(trial.trial_id, int(result["epoch"]))
        return TrialScheduler.CONTINUE if final else action

    def _record(self, trial_id: str, epoch: int) -> None:
        path = Path(self._decisions)
        decisions = read_decisions(path)
        decisions[trial_id] = epoch
        atomic_write_text(path, json.dumps(decisions, indent=1, sort_keys=True))


def read_decisions(path: Path) -> dict[str, int]:
    """Trial id -> the epoch at which the scheduler judged the trial weak."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in values.items()} if isinstance(values, dict) else {}


def scheduler_for(spec: StudySpec, space: TuneSpace, epochs: int, directory: Path) -> Any:
    if spec.scheduler == "fifo":
        return None
    # The epoch index every report carries is the time axis: wall time would make
    # ASHA's rungs depend on how busy the machine was. max_t = epochs is never reached
    # by an index (0 .. epochs-1), so ASHA only ever stops the weaker trials early and a
    # surviving trial always reaches its final test evaluation.
    return LastEpochASHA(epochs=epochs, decisions=str(directory / DECISIONS_FILE),
                         grace_period=1, reduction_factor=2)


# --------------------------------------------------------------------------- MLflow


def open_parent_run(cfg: Config, spec: StudySpec, space: TuneSpace) -> RunHandle:
    """The study's parent run, reopened when the study is resumed."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg.tracking)
    experiment_id = ensure_experiment(uri, cfg.tracking.experiment)
    client = MlflowClient(uri)
    run_name = f"{spec.name}-study"
    location = str(study_dir(cfg, spec.name))
    existing = find_run(uri, experiment_id, run_name, location, kind="tune-study")
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        client.set_tag(existing.info.run_id, RUN_KEY_TAG, run_key("tune-study", location))
        return RunHandle(uri, existing.info.run_id, experiment_id)
    run = client.create_run(experiment_id, run_name=run_name, tags={
        **cfg.tracking.tags, RUN_NAME_TAG: run_name, STUDY_TAG: spec.name,
        KIND_TAG: "tune-study", RUN_KEY_TAG: run_key("tune-study", location)})
    params = {"study.space": spec.space, "study.samples": str(spec.samples),
              "study.scheduler": spec.scheduler, "study.metric": space.metric,
              "study.mode": space.mode, "study.overrides": " ".join(spec.overrides)[:6000],
              **{f"space.{p.key}": _describe(p) for p in space.params}}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_artifact(run.info.run_id, spec.space)
    return RunHandle(uri, run.info.run_id, experiment_id)


def _describe(p: ParamSpec) -> str:
    if p.values:
        return f"{p.distribution}{list(p.values)}"
    q = f", q={p.q}" if p.q is not None else ""
    return f"{p.distribution}({p.low}, {p.high}{q})"


def close_trial_runs(handle: RunHandle, study: str, rows: pd.DataFrame, trials_dir: Path
                     ) -> None:
    """Give every child run its final status and its outputs; none stays RUNNING.

    A trial stopped by ASHA is killed mid-training, and a trial of a killed driver
    never returns: their runs are still RUNNING, and outputs the trial wrote after its
    last report were never logged. Stopped early (no final report) -> FINISHED with
    ``aoq.tune.stopped_early=true``; errored -> FAILED. The best weights, test metrics
    and recall plot in the trial's directory are logged if the run lacks them.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(handle.tracking_uri)
    for row in rows.itertuples():
        name = trial_name(study, row.trial_id)
        run = find_run(handle.tracking_uri, handle.experiment_id, name,
                       run_location(str(trials_dir), name))
        if run is None:
            continue
        if row.stopped_early:
            client.set_tag(run.info.run_id, STOPPED_EARLY_TAG, "true")
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        for file in (BEST_MODEL_FILE, TEST_METRICS_FILE, RECALL_PLOT_FILE):
            if file not in logged and (trials_dir / name / file).is_file():
                client.log_artifact(run.info.run_id, str(trials_dir / name / file))
        status = "FAILED" if row.status == "ERROR" else "FINISHED"
        if run.info.status != status:
            client.set_terminated(run.info.run_id, status)


# --------------------------------------------------------------------------- outputs


def _test_rsum(metrics: dict[str, Any], trial_dir: Path) -> float:
    """The trial's test rsum: from its last report, else from the test metrics its
    rank 0 wrote (a trial can be stopped after its test evaluation, before reporting)."""
    if "test/rsum" in metrics:
        return float(metrics["test/rsum"])
    try:
        return float(json.loads((trial_dir / TEST_METRICS_FILE).read_text())["test/rsum"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan


def results_table(result_grid: Any, space: TuneSpace, study: str | None = None,
                  directory: Path | None = None) -> pd.DataFrame:
    """One row per trial: id, status, epochs done, whether it was stopped early (it
    never sent its final report), the epoch at which the scheduler judged it weak,
    sampled values, best metric, test rsum.

    ``study`` and ``directory`` locate the trials' own files (test metrics, the
    scheduler's verdicts)."""
    decisions = read_decisions(directory / DECISIONS_FILE) if directory else {}
    rows = []
    best_key = space.metric.replace("dev/", "dev/best_") if space.metric == "dev/rsum" \
        else space.metric
    for result in result_grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        if history is not None and space.metric in history:
            series = history[space.metric].dropna()
            best = (series.max() if space.mode == "max" else series.min()) if len(series) \
                else math.nan
        else:
            best = metrics.get(best_key, math.nan)
        config = result.config or {}
        # Tune adds trial_id to every result; a trial that failed before its first
        # report has none, and its directory name is all there is.
        trial_id = metrics.get("trial_id") or Path(result.path).name
        trial_dir = (directory / "trials" / trial_name(study, trial_id)) if directory and \
            study else Path(result.path)
        rows.append({
            "trial_id": trial_id,
            "status": "ERROR" if result.error else "TERMINATED",
            "epochs_done": int(metrics.get("epoch", -1)) + 1,
            "stopped_early": not result.error and not metrics.get("final"),
            "judged_weak_at_epoch": decisions.get(trial_id, math.nan),
            **{k: config.get(k) for k in space.keys},
            space.metric: best,
            "test/rsum": _test_rsum(metrics, trial_dir),
        })
    table = pd.DataFrame(rows)
    return table.sort_values(space.metric, ascending=space.mode == "min",
                             na_position="last").reset_index(drop=True)


def plot_params(table: pd.DataFrame, space: TuneSpace, path: Path) -> None:
    """One panel per searched parameter: sampled value vs the trial's best metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = space.keys
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = table[key]
        numeric = pd.to_numeric(values, errors="coerce")
        x = numeric if numeric.notna().all() else values.astype(str)
        ax.scatter(x, table[space.metric], c=["tab:blue" if s == "TERMINATED" else "tab:red"
                                             for s in table["status"]])
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {space.metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(space.path).name}: sampled values vs best {space.metric}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_base_config(cfg: Config, directory: Path) -> Path:
    """The study's resolved config, which every trial starts from.

    Trials run in Tune's per-trial working directories, so anything resolved against
    the working directory (relative paths, the default ``./mlflow.db``) must be resolved
    here, on the driver, once: every path in this file is absolute.
    """
    tracking = dataclasses.replace(cfg.tracking, uri=resolve_tracking_uri(cfg.tracking))
    resolved = dataclasses.replace(cfg, tracking=tracking)
    path = directory / "base_config.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dump_yaml(resolved))
    return path


def write_best_config(spec: StudySpec, space: TuneSpace, table: pd.DataFrame,
                      directory: Path) -> Path:
    """The best trial's full config, as YAML that ``jobs/train.py --config`` accepts."""
    best = table.iloc[0]
    sampled = {k: best[k] for k in space.keys}
    cfg = load_config(directory / "base_config.yaml",
                      [*as_overrides(sampled), f"run.name={spec.name}-best"])
    path = directory / "best_config.yaml"
    header = (f"# Best trial {best['trial_id']} of study {spec.name!r}: "
              f"{space.metric} {best[space.metric]:.2f}\n# python jobs/train.py --config "
              f"{path}\n")
    atomic_write_text(path, header + dump_yaml(cfg))
    return path


# --------------------------------------------------------------------------- driver


def run_study(spec: StudySpec, *, resume: bool = False) -> StudyOutcome:
    """Run (or continue) a study and write its outputs.

    Raises:
        ConfigError / DataError / CheckpointError: bad settings, space, config, data or
            resources, before any trial starts.
        Terminated / Interrupted: SIGTERM or Ctrl-C (the parent run is marked KILLED).
    """
    problems = spec_problems(dataclasses.asdict(spec))
    if problems:
        raise ConfigError("study settings: " + "; ".join(problems))
    cfg = load_config(spec.config, spec.overrides)
    check_paths(cfg)
    space = load_space(spec.space, spec.config, spec.overrides)
    directory = study_dir(cfg, spec.name)
    if (directory / STUDY_FILE).exists() and not resume:
        raise ConfigError(f"study {spec.name!r} already exists at {directory}; resume it "
                          f"with --resume {spec.name} or choose another --name")
    prepared = prepare_data(cfg.data, progress=True)  # once, before any trial
    check_config_against_data(cfg, prepared)
    check_model_against_data(cfg, prepared)
    base_config = write_base_config(cfg, directory)
    overrides = _shared_tables(cfg, prepared, directory)
    shared_source = overrides[0].split("=", 1)[1] if overrides else cfg.negatives.source
    _check_table_width(space, shared_source, cfg, prepared)
    connect_ray()
    total = ray.cluster_resources()
    worst = check_every_trial(spec, space, str(base_config), overrides, prepared, total)
    limit = concurrency(worst, spec, total.get("CPU", 0))
    save_spec(spec, directory)  # only a study that can run is one that can be resumed
    with stop_signals() as signals:
        parent = open_parent_run(cfg, spec, space)
        print(f"[tune] study {spec.name!r}: {len(space.params)} parameters from "
              f"{spec.space}, {spec.samples} samples, {spec.scheduler}, up to {limit} trials "
              f"at once; MLflow parent run {parent.run_id}", flush=True)
        try:
            ctx = TrialContext(spec.name, str(base_config), overrides, tuple(space.keys),
                               str(directory / "trials"), parent.run_id)
            grid = _tuner(spec, space, cfg, ctx, directory, limit, resume).fit()
            if signals.received() is not None:
                # Tune's own SIGINT handler ends fit() early, without an exception.
                raise KeyboardInterrupt
            table = results_table(grid, space, spec.name, directory)
            close_trial_runs(parent, spec.name, table, directory / "trials")
            best_path = _write_outputs(spec, space, table, directory, parent)
        except BaseException:
            signum = signals.received()
            end_run(parent, "FAILED" if signum is None else "KILLED")
            if signum is None:
                raise
            print(f"[tune] study {spec.name!r} stopped by {signal_label(signum)}; MLflow "
                  f"parent run {parent.run_id} marked KILLED; continue it with: python "
                  f"jobs/tune.py --resume {spec.name} run.storage={cfg.run.storage}",
                  file=sys.stderr, flush=True)
            raise stopped_by(signum) from None
    end_run(parent, "FINISHED")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False), flush=True)
    print(f"[tune] best config: {best_path}\n[tune] python jobs/train.py --config "
          f"{best_path}", flush=True)
    return StudyOutcome(str(directory), parent.run_id, table, str(best_path))


def _tuner(spec: StudySpec, space: TuneSpace, cfg: Config, ctx: TrialContext,
           directory: Path, limit: int, resume: bool) -> tune.Tuner:
    """A new Tuner for the study, or the interrupted one restored."""
    # Ray refuses an empty bundle; a little memory makes the 0-CPU trial placeable.
    resources = {"cpu": spec.trial_cpus, "memory": TRIAL_MEMORY_BYTES}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    tune_path = directory / "tune"
    if resume and tune_path.exists():
        return tune.Tuner.restore(str(tune_path), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={p.key: tune_distribution(p) for p in space.params},
        tune_config=tune.TuneConfig(
            metric=space.metric, mode=space.mode, num_samples=spec.samples,
            scheduler=scheduler_for(spec, space, cfg.optim.epochs, directory),
            # Tune ignores max_concurrent_trials when given a search generator (it
            # warns, then runs every trial at once and the trainers starve for
            # workers): the generator itself must cap concurrency.
            search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=limit)),
        run_config=tune.RunConfig(name="tune", storage_path=str(directory), verbose=1),
    )


def _write_outputs(spec: StudySpec, space: TuneSpace, table: pd.DataFrame, directory: Path,
                   parent: RunHandle) -> Path:
    """best_config.yaml, the plot and summary.csv, also logged to the parent run."""
    best_path = write_best_config(spec, space, table, directory)
    figure = directory / "params_vs_metric.png"
    plot_params(table, space, figure)
    summary = directory / "summary.csv"
    atomic_write_text(summary, table.to_csv(index=False))
    for path in (best_path, figure, summary):
        log_artifact(parent, path)
    best = table.iloc[0]
    log_metrics(parent, {f"best/{space.metric}": float(best[space.metric]),
                         "trials": float(len(table))}, step=0)
    return best_path


def _check_table_width(space: TuneSpace, source: str, cfg: Config,
                       prepared: PreparedData) -> None:
    """Every sampled h must fit the shared tables; say so before any trial starts."""
    kind, path = parse_negative_source(source)
    if kind != "tables" or not uses_offline(cfg.loss):
        return
    train = prepared.splits[cfg.data.train_split]
    width = load_tables(path, n_images=train.n_images,
                        captions_per_image=prepared.captions_per_image).i2t.shape[1]
    ranges = [max(p.probe_values()) for p in space.params
              if p.key == "negatives.sampling_range"] or [cfg.negatives.sampling_range]
    if max(ranges) > width:
        raise ConfigError(f"{space.path}: params.negatives.sampling_range reaches "
                          f"{max(ranges)}, but the shared tables at {path} have {width} "
                          "columns; mine them with negatives.k_captions >= the largest h")


def _shared_tables(cfg: Config, prepared: PreparedData, directory: Path
                   ) -> tuple[str, ...]:
    """Mine a first-round model's tables once for the whole study.

    With ``negatives.source=checkpoint:<model>`` every trial would otherwise mine the
    same tables again; they are mined here once and every trial reads them
    (``tables:``). ``tables:`` sources are shared already; ``mine`` trains each
    trial's own model, whose tables are necessarily its own.
    """
    kind, path = parse_negative_source(cfg.negatives.source)
    if kind != "checkpoint" or not uses_offline(cfg.loss):
        return ()
    root = directory / "shared_tables"
    if list_versions(root):
        return (f"negatives.source=tables:{version_dir(root, list_versions(root)[-1])}",)
    start = time.perf_counter()
    i2t, t2i, meta = mine_from_checkpoint(path, open_split(prepared, cfg.data.train_split),
                                          cfg.negatives, vocab_size=prepared.vocab_size,
                                          vocab_fingerprint=prepared.vocab_fingerprint,
                                          progress=True)
    saved = save_tables(root, 1, i2t, t2i, **meta)
    print(f"[tune] mined the study's shared tables once in "
          f"{time.perf_counter() - start:.1f}s: {saved}", flush=True)
    return (f"negatives.source=tables:{saved}",)
