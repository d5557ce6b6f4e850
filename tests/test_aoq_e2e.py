"""End to end: AOQ training with offline negatives in its three workflows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aoq.losses import TERM_NAMES
from aoq.negatives.tables import list_versions, load_tables

from conftest import small_overrides, train_small

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mined_run(tmp_path_factory: pytest.TempPathFactory, scenes_cache: Path, local_ray):
    """aoq with negatives.source=mine: 1 warm-up epoch, then synchronous mining on rank 0
    every epoch (the actor pool has its own tests in test_async_refresh_e2e.py)."""
    return train_small(tmp_path_factory.mktemp("aoq-mine"), scenes_cache,
                       "loss.variant=aoq", "negatives.source=mine", "optim.epochs=3",
                       "negatives.warmup_epochs=1", "negatives.refresh_every=1",
                       "negatives.pool_actors=0", "run.name=mine")


def test_mine_workflow_logs_terms_and_table_versions(mined_run) -> None:
    outcome, client = mined_run.outcome, mined_run.client
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    versions = client.get_metric_history(outcome.run_id, "negatives/table_version")
    assert [(m.step, m.value) for m in sorted(versions, key=lambda m: m.step)] == [
        (0, 0.0), (1, 1.0), (2, 2.0)]
    offline = sorted(client.get_metric_history(outcome.run_id, "loss_variant_is_offline"),
                     key=lambda m: m.step)
    assert [m.value for m in offline] == [0.0, 1.0, 1.0]  # warm-up epoch is triplet
    for term in TERM_NAMES:
        history = client.get_metric_history(outcome.run_id, f"train/{term}")
        expected = 3 if term.startswith("online") else 2
        assert len(history) == expected, term
    staleness = client.get_metric_history(outcome.run_id, "negatives/staleness_epochs")
    # Synchronous mining uses the weights of the moment: no epoch trained since the snapshot.
    assert {m.value for m in staleness} == {0.0}
    root = Path(outcome.output_dir) / "negatives"
    assert list_versions(root) == [1, 2]
    tables = load_tables(root, n_images=240)
    assert tables.meta["epoch"] == 2 and tables.i2t.shape == (240, 100)
    assert tables.t2i.shape == (1200, 40)


def test_checkpoint_workflow_mines_once_from_a_first_round_model(mined_run,
                                                                  scenes_cache: Path) -> None:
    best = mined_run.output_dir / "best_model.pt"
    small = train_small(mined_run.tmp, scenes_cache, "loss.variant=offquin",
                        f"negatives.source=checkpoint:{best}", "optim.epochs=2",
                        "run.name=from-ckpt")
    outcome, client = small.outcome, small.client
    root = Path(outcome.output_dir) / "negatives"
    assert list_versions(root) == [1]
    assert load_tables(root).meta["source"] == f"checkpoint:{best}"
    history = client.get_metric_history(outcome.run_id, "train/quintuplet_positive_pair")
    assert len(history) == 2  # offline terms from the first epoch: no warm-up


def test_mine_job_then_tables_workflow(mined_run, scenes_cache: Path) -> None:
    tmp = mined_run.tmp
    best = mined_run.output_dir / "best_model.pt"
    out = tmp / "tables"
    overrides = small_overrides(tmp, scenes_cache)
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "mine.py"), "--checkpoint",
                           str(best), "--out", str(out), *overrides],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list_versions(out) == [1]
    outcome = train_small(tmp, scenes_cache, "loss.variant=offtri",
                          f"negatives.source=tables:{out}", "optim.epochs=1",
                          "run.name=from-tables").outcome
    assert outcome.test_metrics["test/rsum"] > 0
