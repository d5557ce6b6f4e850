"""Each of the paper's models trains with the aoq loss under Ray Train, end to end.

Global-embedding models (vsrn, vse_gpo) mine their own offline negatives; the
cross-attention models (scan, bfan) take theirs from a first-round vsrn checkpoint, as
the authors did for BFAN, and score their test split on the actor pool.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aoq.negatives.tables import list_versions, load_tables

from conftest import store_client, train_small

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.long]

VSRN_SMALL = ("model.caption_hidden=16", "model.caption_word_dim=8")


def train(tmp: Path, cache: Path, *extra: str, epochs: int = 2):
    small = train_small(tmp, cache, "loss.variant=aoq", f"optim.epochs={epochs}", *extra)
    cfg, outcome, run = small.cfg, small.outcome, small.run
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == cfg.model.name
    assert set(outcome.test_metrics) >= {"test/rsum", "test/i2t_r1", "test/t2i_r10"}
    assert 0 < outcome.test_metrics["test/rsum"] <= 600
    assert (Path(outcome.output_dir) / "best_model.pt").is_file()
    return outcome, run


@pytest.fixture(scope="module")
def vsrn_run(tmp_path_factory: pytest.TempPathFactory, scenes_cache: Path, local_ray):
    tmp = tmp_path_factory.mktemp("vsrn")
    outcome, run = train(tmp, scenes_cache, "model.name=vsrn", *VSRN_SMALL,
                         "negatives.source=mine", "negatives.warmup_epochs=1",
                         "negatives.pool_actors=0", "run.name=vsrn")
    return tmp, outcome, run


def test_vsrn_mines_its_own_tables_and_logs_its_caption_loss(vsrn_run) -> None:
    tmp, outcome, run = vsrn_run
    client = store_client(tmp)
    auxiliary = client.get_metric_history(outcome.run_id, "train/auxiliary")
    assert len(auxiliary) == 2 and all(m.value > 0 for m in auxiliary)
    assert list_versions(Path(outcome.output_dir) / "negatives") == [1]


def test_vse_gpo_trains_with_the_actor_pool_refreshing(scenes_cache: Path, local_ray,
                                                       tmp_path: Path) -> None:
    outcome, _ = train(tmp_path, scenes_cache, "model.name=vse_gpo", "negatives.source=mine",
                       "negatives.warmup_epochs=1", "run.name=gpo")
    assert list_versions(Path(outcome.output_dir) / "negatives")


@pytest.mark.parametrize("name,option", [("scan", "model.aggregation=lse"),
                                         ("bfan", "model.focal_type=prob")])
def test_cross_attention_models_train_on_a_vsrn_mining_model(vsrn_run, scenes_cache: Path,
                                                             name: str, option: str) -> None:
    tmp, first, _ = vsrn_run
    best = Path(first.output_dir) / "best_model.pt"
    outcome, run = train(tmp, scenes_cache, f"model.name={name}", option,
                         f"negatives.source=checkpoint:{best}", f"run.name={name}", epochs=1)
    tables = load_tables(Path(outcome.output_dir) / "negatives")
    assert tables.meta["source"] == f"checkpoint:{best}"
    client = store_client(tmp)
    # Offline terms from the first epoch: the tables exist before training starts.
    assert len(client.get_metric_history(outcome.run_id, "train/offline_image_negative")) == 1
