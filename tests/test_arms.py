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
