"""Compare finished runs arm by arm (e.g. refresh-every-epoch against fixed tables).

An *arm* is a run-name prefix; its runs are ``<prefix>-s<seed>``. For each arm the table
gives the test rsum (mean ± sample std over seeds), the hardness of the sampled
negatives per epoch (the logged ``train/hardness_offline_mean`` and
``train/hardness_online_mean``: S(I, T_neg) − S(I, T) of the offline caption negative
and of the hardest in-batch caption, averaged over seeds), and the wall time per run.
An arm may name the runs it needed first (a first-round model whose tables it used):
their time is added to its total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aoq.cluster.tracking import _client, ensure_experiment, find_run
from aoq.config import ConfigError
from aoq.storage import run_location

HARDNESS_KEYS = ("train/hardness_offline_mean", "train/hardness_online_mean")


@dataclass(frozen=True)
class RunSummary:
    name: str
    rsum: float
    minutes: float
    hardness: dict[str, list[float]]  # metric key -> value per epoch


@dataclass(frozen=True)
class Arm:
    label: str
    runs: list[RunSummary]
    first_round: list[RunSummary]  # runs this arm's tables came from ([] if none)


def summarize_run(uri: str, experiment: str, storage: str, name: str) -> RunSummary:
    """Test rsum, minutes and hardness history of the finished run called ``name`` whose
    outputs are under ``storage`` (``run.storage``)."""
    run = find_run(uri, ensure_experiment(uri, experiment), name, run_location(storage, name))
    if run is None or run.info.status != "FINISHED" or "test/rsum" not in run.data.metrics:
        raise ConfigError(f"no finished run named {name!r} with test metrics in {uri}")
    client = _client(uri)
    hardness = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                              key=lambda m: m.step)]
                for key in HARDNESS_KEYS}
    minutes = ((run.info.end_time or 0) - run.info.start_time) / 60000
    return RunSummary(name, float(run.data.metrics["test/rsum"]), minutes, hardness)


def _mean_std(values: Sequence[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}"


def _per_epoch(runs: Sequence[RunSummary], key: str) -> str:
    curves = [r.hardness[key] for r in runs if r.hardness.get(key)]
    if not curves:
        return "—"
    length = min(len(c) for c in curves)
    mean = np.mean([c[-length:] for c in curves], axis=0)
    return ", ".join(f"{v:+.2f}" for v in mean)


def arms_table(arms: Sequence[Arm]) -> str:
    """A Markdown table of the arms (see the module docstring)."""
    lines = ["| arm | seeds | test rsum | offline negative − positive, per epoch with tables "
             "| hardest in-batch − positive, per epoch | minutes per run | with first round |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        minutes = [r.minutes for r in arm.runs]
        total = [r.minutes + f.minutes for r, f in zip(arm.runs, arm.first_round)]
        lines.append(
            f"| {arm.label} | {len(arm.runs)} | {_mean_std([r.rsum for r in arm.runs])} | "
            f"{_per_epoch(arm.runs, HARDNESS_KEYS[0])} | {_per_epoch(arm.runs, HARDNESS_KEYS[1])} "
            f"| {np.mean(minutes):.1f} | {f'{np.mean(total):.1f}' if total else '—'} |")
    return "\n".join(lines)
