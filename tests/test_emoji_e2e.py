"""The default job (aoq, mined tables refreshed by the actor pool) runs on the built-in
emoji dataset, built on first use by the driver."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import train_small

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

SMALL_EMOJI = ["data.dataset=emoji", "data.emoji.max_images=60", "data.emoji.n_test=20",
               "data.emoji.n_dev=10", "data.emoji.image_size=48",
               "negatives.k_captions=100", "negatives.k_images=20",
               "negatives.sampling_range=10"]


def test_default_job_trains_aoq_on_emoji(tmp_path: Path, local_ray) -> None:
    small = train_small(tmp_path, tmp_path / "cache", *SMALL_EMOJI, "optim.epochs=2",
                        "run.name=e2e-emoji", "tracking.experiment=e2e")
    run = small.client.get_run(small.outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "emoji" and run.data.params["loss.variant"] == "aoq"
    assert run.data.params["data.emoji.max_images"] == "60"
    assert {"test/rsum", "test/i2t_r1"} <= set(small.outcome.test_metrics)
    # Epoch 2 trained on tables mined after the triplet warm-up.
    assert [v for _, v in small.history("loss_variant_is_offline")] == [0.0, 1.0]
    assert (tmp_path / "runs" / "e2e-emoji" / "negatives" / "v0001" / "meta.json").exists()
