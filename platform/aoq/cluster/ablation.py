"""The paper's ablation: every loss variant x several seeds, same budget, one report.

Each (variant, seed) is an ordinary training job (its own MLflow run), tagged with the
study's group so the MLflow UI can filter and compare them. The summary (mean +- std of
every test metric per variant) is written as Markdown, and the dev-rsum curves of every
run go into one plot, logged with the table in a summary run of the same group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from aoq.atomic import atomic_write_text
from aoq.cluster.job import TrainingOutcome, run_training
from aoq.cluster.tracking import (
    RunHandle, end_run, ensure_experiment, find_run, log_artifact, log_metrics,
    resolve_tracking_uri,
)
from aoq.config import BUILT_IN_DATASETS, Config, load_config
from aoq.storage import run_location
from aoq.training.run_files import TEST_METRICS_FILE

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@dataclasses.dataclass(frozen=True)
class AblationRun:
    variant: str
    seed: int
    outcome: TrainingOutcome
    dev_rsum: list[float]
    reused: bool = False  # finished by an earlier invocation of the study


def machine_description() -> str:
    import torch

    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, torch {torch.__version__}").replace("  ", " ")


def finished_outcome(cfg: Config) -> TrainingOutcome | None:
    """The outcome of this exact run if an earlier invocation already finished it.

    A run counts as finished when its test metrics were written and its MLflow run is
    FINISHED; anything less is resumed, so a study killed midway loses at most the
    epoch in flight.
    """
    output_dir = Path(cfg.run.storage) / cfg.run.name
    metrics_file = output_dir / TEST_METRICS_FILE
    if not metrics_file.exists():
        return None
    uri = resolve_tracking_uri(cfg.tracking)
    run = find_run(uri, ensure_experiment(uri, cfg.tracking.experiment), cfg.run.name,
                   run_location(cfg.run.storage, cfg.run.name))
    if run is None or run.info.status != "FINISHED":
        return None
    # MLflow's start-to-end time: the run's training time unless it was interrupted.
    seconds = max(0.0, ((run.info.end_time or 0) - run.info.start_time) / 1000)
    return TrainingOutcome(cfg.run.name, run.info.run_id, str(output_dir),
                           json.loads(metrics_file.read_text()), seconds)


def dev_history(cfg: Config, run_id: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(cfg.tracking))
    history = sorted(client.get_metric_history(run_id, "dev/rsum"), key=lambda m: m.step)
    return [m.value for m in history]


def summary_table(runs: Sequence[AblationRun], variants: Sequence[str]) -> pd.DataFrame:
    """Rows: variants in the given order; columns: '<metric>' mean and '<metric>_std'."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r.variant == variant]
        row: dict[str, float | str | int] = {"variant": variant, "seeds": len(mine)}
        for key in METRIC_KEYS:
            values = np.array([r.outcome.test_metrics[f"test/{key}"] for r in mine])
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        row["minutes_per_run"] = float(np.mean([r.outcome.seconds for r in mine]) / 60)
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def markdown_table(table: pd.DataFrame) -> str:
    head = "| variant | seeds | " + " | ".join(k.replace("_", " ") for k in METRIC_KEYS) + " |"
    sep = "|---|---|" + "---|" * len(METRIC_KEYS)
    lines = [head, sep]
    for variant, row in table.iterrows():
        cells = [f"{row[k]:.1f} ± {row[f'{k}_std']:.1f}" for k in METRIC_KEYS]
        lines.append(f"| {variant} | {int(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_dev_curves(runs: Sequence[AblationRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    variants = list(dict.fromkeys(r.variant for r in runs))
    colours = dict(zip(variants, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for variant in variants:
        curves = [r.dev_rsum for r in runs if r.variant == variant]
        length = min(len(c) for c in curves)
        stacked = np.array([c[:length] for c in curves])
        epochs = np.arange(1, length + 1)
        mean = stacked.mean(axis=0)
        ax.plot(epochs, mean, color=colours[variant], label=f"{variant} (n={len(curves)})")
        ax.fill_between(epochs, stacked.min(axis=0), stacked.max(axis=0),
                        color=colours[variant], alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev rsum")
    ax.set_title("dev rsum per epoch (mean; band = min..max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_ablation(
    base_config: str | None,
    overrides: Sequence[str],
    *,
    variants: Sequence[str],
    seeds: Sequence[int],
    group: str,
    report_path: Path,
    command: str,
) -> pd.DataFrame:
    """Train every (variant, seed), then write the report and the summary run."""
    start = time.perf_counter()
    runs: list[AblationRun] = []
    cfg = None
    for variant in variants:
        for seed in seeds:
            cfg = load_config(base_config, [
                *overrides, f"loss.variant={variant}", f"run.seed={seed}",
                f"run.name={group}-{variant}-s{seed}", f"tracking.tags.group={group}",
            ])
            outcome = finished_outcome(cfg)
            reused = outcome is not None
            if reused:
                print(f"[ablation] {variant} seed {seed}: already finished "
                      f"(MLflow run {outcome.run_id}), reusing it", flush=True)
            else:
                resuming = (Path(cfg.run.storage) / cfg.run.name).exists()
                if resuming:
                    # An interrupted study continues where each run stopped instead of
                    # refusing the existing directory or retraining from scratch.
                    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))
                print(f"[ablation] {variant} seed {seed}{' (resuming)' if resuming else ''}",
                      flush=True)
                outcome = run_training(cfg)
            runs.append(AblationRun(variant, seed, outcome, dev_history(cfg, outcome.run_id),
                                    reused))
    assert cfg is not None
    table = summary_table(runs, variants)
    figure = report_path.with_name(f"{report_path.stem}_dev_rsum.png")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    plot_dev_curves(runs, figure)
    wall = time.perf_counter() - start
    generated = render_report(table, runs, cfg, command, wall, figure.name, group)
    old = report_path.read_text() if report_path.exists() else None
    atomic_write_text(report_path, splice_report(old, generated))
    _log_summary_run(cfg, group, table, figure, report_path)
    return table


REPORT_START = "<!-- ablation report: written by jobs/ablation.py, kept up to date there -->"
REPORT_END = "<!-- end of the ablation report -->"


def splice_report(old: str | None, generated: str) -> str:
    """The report file with its generated block replaced by ``generated``.

    Results files also hold hand-written analysis and other studies around the block;
    re-running the ablation must not erase them. A file without the markers is replaced
    whole (it can only be an older generated report)."""
    block = f"{REPORT_START}\n{generated.rstrip()}\n{REPORT_END}\n"
    if old is None or REPORT_START not in old or REPORT_END not in old:
        return block
    head, rest = old.split(REPORT_START, 1)
    return head + block + rest.split(REPORT_END, 1)[1].lstrip("\n")


def dataset_label(cfg: Config) -> str:
    return cfg.data.dataset if cfg.data.dataset in BUILT_IN_DATASETS else Path(
        cfg.data.dataset).name


def test_split_description(cfg: Config) -> str:
    """What the test split is, said wherever its numbers appear."""
    if cfg.data.dataset == "scenes":
        return f"{cfg.data.scenes.n_test} images, unseen colour-object pairs"
    if cfg.data.dataset == "emoji":
        return (f"{cfg.data.emoji.n_test} emoji whose families are unseen in training; "
                "drawings with label-like captions, not photos")
    return f"`{cfg.data.test_split}`, {cfg.data.test_folds} fold(s)"


def render_report(table: pd.DataFrame, runs: Sequence[AblationRun], cfg: Config, command: str,
                  wall: float, figure: str, group: str) -> str:
    ordered = list(table.index)
    trained = sum(1 for r in runs if not r.reused)
    rsum = table["rsum"]
    paper = ["triplet", "offtri", "offquin", "aoq"]
    if all(v in rsum.index for v in paper):
        holds = all(rsum[a] < rsum[b] for a, b in zip(paper, paper[1:]))
        verdict = f"**{'holds' if holds else 'does not hold'}** here."
    else:  # a partial study says nothing about the ordering
        verdict = "not assessed (the study does not train all four variants)."
    lines = [
        f"# Ablation on `{dataset_label(cfg)}`, model `{cfg.model.name}`: {', '.join(ordered)}",
        "",
        f"Test split ({test_split_description(cfg)}), "
        "single models, mean ± sample std over seeds. "
        f"MLflow group tag: `group={group}`.",
        "",
        markdown_table(table),
        "",
        f"![dev rsum per epoch]({figure})",
        "",
        f"- Paper ordering triplet < offtri < offquin < aoq on rsum: {verdict}",
        f"- Command: `{command}`",
        f"- Machine: {machine_description()}",
        f"- Wall time: {wall / 60:.1f} min for the {trained} runs trained by the last "
        f"invocation" + (f" ({len(runs) - trained} finished runs reused from an earlier one)"
                         if trained < len(runs) else ""),
        "- Per-run training time (min): " + ", ".join(
            f"{r.variant}/s{r.seed} {r.outcome.seconds / 60:.1f}" for r in runs),
        f"- Date: {time.strftime('%Y-%m-%d')}",
        "",
    ]
    return "\n".join(lines)


def _log_summary_run(cfg: Config, group: str, table: pd.DataFrame, figure: Path,
                     report: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg.tracking)
    experiment_id = ensure_experiment(uri, cfg.tracking.experiment)
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=f"{group}-summary",
                            tags={"group": group, "aoq.kind": "ablation-summary"})
    handle = RunHandle(uri, run.info.run_id, experiment_id)
    for variant, row in table.iterrows():
        log_metrics(handle, {f"{variant}/{k}": row[k] for k in METRIC_KEYS}, step=0)
    log_artifact(handle, figure)
    log_artifact(handle, report)
    end_run(handle, "FINISHED")
