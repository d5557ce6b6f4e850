"""The arm comparison table (refresh vs fixed tables): means, spreads, per-epoch
hardness and the first round's time, from given run summaries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aoq.cluster.arms import Arm, RunSummary, arms_table

ROOT = Path(__file__).resolve().parents[1]


def summary(rsum: float, minutes: float, offline: list[float]) -> RunSummary:
    return RunSummary("r", rsum, minutes, {"train/hardness_offline_mean": offline,
                                           "train/hardness_online_mean": [-0.3] * 3})


def test_table_gives_mean_std_hardness_per_epoch_and_total_time() -> None:
    refresh = Arm("refresh", [summary(100, 4, [-0.2, -0.1]), summary(104, 6, [-0.4, -0.3])], [])
    fixed = Arm("fixed", [summary(98, 3, [-0.5, -0.5, -0.5])] * 2,
                [summary(90, 2, [])] * 2)
    rows = arms_table([refresh, fixed]).splitlines()
    assert rows[2] == ("| refresh | 2 | 102.0 ± 2.8 | -0.30, -0.20 | -0.30, -0.30, -0.30 "
                       "| 5.0 | — |")
    assert rows[3] == ("| fixed | 2 | 98.0 ± 0.0 | -0.50, -0.50, -0.50 | -0.30, -0.30, "
                       "-0.30 | 3.0 | 5.0 |")


def test_a_malformed_arm_is_one_error_line_and_exit_2() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "compare_arms.py"),
                           "--arm", "refresh"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --arm 'refresh'")


def test_compare_arms_reads_runs_recorded_by_the_tracking_layer(tmp_path: Path) -> None:
    """Runs recorded as a training job records them (a real SQLite store, run keys from
    run.storage) are found by name and summarised by jobs/compare_arms.py."""
    from aoq.cluster.tracking import end_run, log_metrics, start_run
    from aoq.config import load_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "runs"
    for arm, rsums in (("refresh", (100.0, 104.0)), ("fixed", (90.0, 94.0))):
        for seed, rsum in enumerate(rsums):
            cfg = load_config(overrides=[f"tracking.uri={uri}", f"run.storage={storage}"])
            handle = start_run(cfg, f"{arm}-s{seed}", {}, resume=False)
            for epoch, hardness in enumerate((-0.3, -0.1)):
                log_metrics(handle, {"train/hardness_offline_mean": hardness}, epoch)
            log_metrics(handle, {"test/rsum": rsum}, 2)
            end_run(handle, "FINISHED")
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "compare_arms.py"), "--seeds", "0", "1",
         "--arm", "refresh=refresh", "--arm", "fixed=fixed", f"tracking.uri={uri}",
         f"run.storage={storage}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [r for r in done.stdout.splitlines() if r.startswith("| ")]
    assert rows[1].startswith("| refresh | 2 | 102.0 ± 2.8 | -0.30, -0.10 |")
    assert rows[2].startswith("| fixed | 2 | 92.0 ± 2.8 | -0.30, -0.10 |")
