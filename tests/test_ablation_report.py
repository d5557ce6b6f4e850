"""The ablation's summary: means, sample std and the honest verdict on the ordering."""

from __future__ import annotations

import pytest

from aoq.cluster.ablation import METRIC_KEYS, AblationRun, render_report, summary_table
from aoq.cluster.job import TrainingOutcome
from aoq.config import load_config


def run(variant: str, seed: int, rsum: float) -> AblationRun:
    metrics = {f"test/{k}": 0.0 for k in METRIC_KEYS}
    metrics["test/rsum"] = rsum
    outcome = TrainingOutcome(f"{variant}-s{seed}", f"id-{variant}-{seed}", "/tmp/x",
                              metrics, 60.0 * (seed + 1))
    return AblationRun(variant, seed, outcome, [rsum - 1, rsum])


def test_summary_has_mean_and_sample_std_per_variant() -> None:
    runs = [run("triplet", 0, 500.0), run("triplet", 1, 502.0), run("triplet", 2, 504.0)]
    table = summary_table(runs, ["triplet"])
    assert table.loc["triplet", "rsum"] == pytest.approx(502.0)
    assert table.loc["triplet", "rsum_std"] == pytest.approx(2.0)  # ddof=1
    assert table.loc["triplet", "seeds"] == 3
    assert table.loc["triplet", "minutes_per_run"] == pytest.approx(2.0)


@pytest.mark.parametrize("rsums, verdict", [
    ({"triplet": 500, "offtri": 501, "offquin": 502, "aoq": 503}, "**holds**"),
    ({"triplet": 500, "offtri": 501, "offquin": 503, "aoq": 502}, "**does not hold**"),
    ({"aoq": 503}, "not assessed"),
])
def test_the_report_states_whether_the_paper_ordering_holds(rsums, verdict) -> None:
    runs = [run(v, s, r + s) for v, r in rsums.items() for s in range(2)]
    table = summary_table(runs, list(rsums))
    report = render_report(table, runs, load_config(None, []), "python jobs/ablation.py",
                           120.0, "fig.png", "g")
    assert f"Paper ordering triplet < offtri < offquin < aoq on rsum: {verdict}" in report
    assert "python jobs/ablation.py" in report and "group=g" in report


def test_rewriting_the_report_keeps_the_hand_written_sections_around_it() -> None:
    from aoq.cluster.ablation import REPORT_END, REPORT_START, splice_report

    first = splice_report(None, "# Ablation\nold table\n")
    assert first.startswith(REPORT_START) and first.rstrip().endswith(REPORT_END)
    edited = "intro\n" + first + "\n## Analysis\nkeep me\n"
    again = splice_report(edited, "# Ablation\nnew table\n")
    assert again.startswith("intro\n") and "new table" in again and "old table" not in again
    assert again.rstrip().endswith("## Analysis\nkeep me")
    # A file without the markers is an older generated report: replaced whole.
    assert "stale" not in splice_report("stale report\n", "# Ablation\n")
