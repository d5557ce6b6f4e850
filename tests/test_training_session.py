"""The Ray-free training session: build, train an epoch, evaluate, checkpoint and resume,
all in this process with one rank (no Ray, no MLflow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aoq.config import load_config
from aoq.data.prepare import prepare_data
from aoq.negatives.from_model import mine_from_model
from aoq.negatives.tables import load_tables, save_tables
from aoq.storage import RunStorage
from aoq.training.run_files import BEST_MODEL_FILE, TEST_METRICS_FILE
from aoq.training.session import TrainingSession

from conftest import SMALL_SCENES


@pytest.fixture(scope="module")
def setup(scenes_cache: Path):
    cfg = load_config(None, [*SMALL_SCENES, f"data.cache_dir={scenes_cache}",
                             "optim.epochs=3", "negatives.warmup_epochs=1"])
    return cfg, prepare_data(cfg.data, progress=False)


def new_session(setup, root: Path) -> TrainingSession:
    cfg, prepared = setup
    session = TrainingSession(cfg, prepared, RunStorage(str(root), "run", cfg.data.cache_dir))
    session.build()
    return session


def weights(session: TrainingSession) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in session.core.state_dict().items()}


def test_a_session_trains_evaluates_and_keeps_the_best(setup, tmp_path: Path) -> None:
    session = new_session(setup, tmp_path)
    before = weights(session)
    metrics, stats = session.run_epoch(0)
    assert metrics["epoch"] == 0 and metrics["loss_variant_is_offline"] == 0.0
    assert np.isfinite(metrics["train/loss"]) and stats.steps == len(session.sampler)
    assert {"dev/rsum", "dev/best_rsum", "lr", "memory/peak_anon_mib"} <= set(metrics)
    assert any(not torch.equal(before[k], v) for k, v in session.core.state_dict().items())
    assert (tmp_path / "run" / BEST_MODEL_FILE).exists()
    assert session.hardness_plot(0, stats.hardness).exists()

    test = session.evaluate_test()
    assert set(test) >= {"test/rsum", "test/i2t_r1", "test/t2i_r10"}
    assert json.loads((tmp_path / "run" / TEST_METRICS_FILE).read_text()) == test


def test_offline_tables_switch_the_loss_to_the_configured_variant(setup, tmp_path: Path
                                                                  ) -> None:
    cfg, _ = setup
    session = new_session(setup, tmp_path)
    session.run_epoch(0)
    i2t, t2i = mine_from_model(session.core, session.train_split,
                               k_captions=cfg.negatives.k_captions,
                               k_images=cfg.negatives.k_images)
    tables = load_tables(save_tables(tmp_path / "tables", 1, i2t, t2i))
    session.set_tables(tables, snapshot_epoch=1)
    metrics, _ = session.run_epoch(1)
    assert metrics["loss_variant_is_offline"] == 1.0
    assert metrics["negatives/table_version"] == 1
    assert metrics["negatives/staleness_epochs"] == 0
    assert metrics["train/quintuplet_positive_pair"] >= 0


def test_checkpoint_state_resumes_exactly(setup, tmp_path: Path) -> None:
    straight = new_session(setup, tmp_path / "a")
    for epoch in range(2):
        straight.run_epoch(epoch)

    first = new_session(setup, tmp_path / "b")
    first.run_epoch(0)
    state = first.state(0)
    resumed = new_session(setup, tmp_path / "b")
    resumed.load_state(state)
    assert resumed.start_epoch == 1 and resumed.best_rsum == first.best_rsum
    resumed.run_epoch(1)

    for name, value in straight.core.state_dict().items():
        assert torch.equal(value, resumed.core.state_dict()[name]), name
    assert resumed.optimizer.state_dict()["state"].keys() == \
        straight.optimizer.state_dict()["state"].keys()


def test_the_session_never_imports_ray_or_mlflow() -> None:
    code = ("import sys, aoq.training.session; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
