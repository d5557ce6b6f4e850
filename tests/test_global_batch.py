"""A global batch means the same on 1 or N workers; a step encodes each distinct item once.

Most of it is Ray-free: the sampler, the per-pair offline draws, the deduplicated step
(same loss and gradients as encoding every slot), and training on 1 and 2 gloo ranks of
the real TrainingSession (tests/gloo_ranks.py) for the default model and for scan. One
small Ray Train job on 1 and on 2 workers checks the same end to end.

Tolerances. What differs between 1 and N ranks is only the order of floating-point
reductions (a matrix of products split over ranks, DDP's all-reduce, a gather's
reduce-scatter):

* one step's gradients: within 1e-5 of each tensor's largest (measured 7e-7);
* weights of the default model after training: max |w1 - wN| <= 1e-5 (measured 6e-8
  after two epochs, for 1, 2 and 4 ranks). One Adam step moves a weight by up to about
  lr = 5e-4, so a step that saw other pairs or negatives moves some weight far more
  (per-worker batches, checked below, give gradients that differ by percents);
* weights of scan after 8 steps: the same bound (measured 7.5e-8); scan amplifies
  float noise over longer training, see its test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from aoq.cluster.job import check_config_against_data
from aoq.config import Config, ConfigError, load_config
from aoq.data.prepare import open_split, prepare_data
from aoq.losses import AOQLoss
from aoq.models import build_model
from aoq.negatives.from_model import mine_from_model
from aoq.negatives.sampling import draw_offline, epoch_sampling_rng
from aoq.negatives.tables import CandidateTables, load_tables, save_tables
from aoq.storage import RunStorage
from aoq.training.batches import (
    BatchRequest, EpochBatchSampler, GlobalBatchSampler, PairDataset, distinct_rows,
)
from aoq.training.checkpoint import newest_complete_checkpoint
from aoq.training.session import TrainingSession
from aoq.training.steps import batch_scores

from conftest import SMALL_SCENES, train_small
from gloo_ranks import RankJob, run_job, spawn_jobs
from ray_head import free_ports

TOLERANCE = 1e-5


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def small(scenes_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """The small scenes data, and tables mined from a freshly initialised vse model."""
    cfg = load_config(None, [*SMALL_SCENES, f"data.cache_dir={scenes_cache}"])
    prepared = prepare_data(cfg.data, progress=False)
    split = open_split(prepared, cfg.data.train_split)
    torch.manual_seed(0)
    miner = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim)
    i2t, t2i = mine_from_model(miner, split, k_captions=cfg.negatives.k_captions,
                               k_images=cfg.negatives.k_images)
    tables = save_tables(tmp_path_factory.mktemp("tables"), 1, i2t, t2i)
    return prepared, split, str(tables)


# ----------------------------------------------------------------------------- batches


def test_global_batches_are_the_same_pairs_for_any_number_of_ranks() -> None:
    def steps(world: int, epoch: int) -> list[np.ndarray]:
        ranks = []
        for rank in range(world):
            sampler = GlobalBatchSampler(103, 12, rank=rank, world=world, seed=4)
            sampler.set_epoch(epoch)
            requests = list(sampler)
            assert len(requests) == len(sampler) == 8  # 103 // 12; the last 7 pairs wait
            assert all(len(r.caption_ids) == 12 // world for r in requests)
            ranks.append(requests)
        for requests in zip(*ranks):  # one step: the ranks' slices, in rank order
            assert all(np.array_equal(r.batch_caption_ids, requests[0].batch_caption_ids)
                       for r in requests)
            assert np.array_equal(np.concatenate([r.caption_ids for r in requests]),
                                  requests[0].batch_caption_ids)
        return [r.batch_caption_ids for r in ranks[0]]

    one = steps(1, epoch=3)
    for world in (2, 3, 4):
        assert all(np.array_equal(a, b) for a, b in zip(one, steps(world, epoch=3)))
    seen = np.concatenate(one)
    assert len(set(seen.tolist())) == len(seen) == 96
    assert not np.array_equal(seen, np.concatenate(steps(1, epoch=4)))


def test_a_global_batch_that_does_not_split_evenly_is_refused(small) -> None:
    with pytest.raises(ValueError, match="does not split evenly"):
        GlobalBatchSampler(100, 10, rank=0, world=4)
    with pytest.raises(ConfigError) as error:
        load_config(None, ["optim.batch_size=30", "run.num_workers=4"])
    assert "optim.batch_size=30: must be divisible by run.num_workers=4" in str(error.value)
    # Per-worker batches need no split.
    load_config(None, ["optim.batch_size=30", "run.num_workers=4", "optim.batch_scope=worker"])

    prepared, _, _ = small
    pairs = prepared.splits["train"].n_images * prepared.captions_per_image
    cfg = load_config(None, [*SMALL_SCENES, f"optim.batch_size={2 * pairs}"])
    with pytest.raises(ConfigError, match=f"only {pairs} pairs, less than one global batch"):
        check_config_against_data(cfg, prepared)


def test_offline_draws_are_keyed_by_pair_not_by_rank_or_step(small) -> None:
    _, split, tables_path = small
    tables = load_tables(tables_path)
    caps = np.array([3, 70, 455, 1001, 1190])

    def partners(rank: int, step: int, ids: np.ndarray, epoch: int = 2) -> dict[int, tuple]:
        dataset = PairDataset(split, seed=7, rank=rank, sampling_range=50, tables=tables,
                              draws="pair")
        draw = dataset.offline_draw(BatchRequest(epoch, step, ids))
        return {int(c): tuple(int(getattr(draw, f.name)[i])
                              for f in dataclasses.fields(draw)) for i, c in enumerate(ids)}

    reference = partners(0, 0, caps)
    assert partners(1, 9, caps[::-1]) == reference
    assert {c: v for c, v in partners(3, 4, np.array([455, 12, 3])).items()
            if c in reference} == {c: reference[c] for c in (3, 455)}
    # The authors' rule, drawn once per epoch for the whole split, indexed by caption.
    whole = draw_offline(np.arange(split.n_captions), tables.i2t, tables.t2i, 50,
                         epoch_sampling_rng(7, 2))
    assert all(reference[c][0] == whole.caption_negative[c] for c in caps)
    assert partners(0, 0, caps, epoch=3) != reference


# ----------------------------------------------------------------------------- one step


def test_distinct_rows_keep_the_anchors_and_encode_each_partner_once() -> None:
    anchors = np.array([5, 9, 5, 2])
    partners = np.array([9, 7, 7, 3, 5, 3, 11, 2])
    rows, slots = distinct_rows(anchors, partners)
    assert rows.tolist() == [5, 9, 5, 2, 3, 7, 11]
    assert np.array_equal(rows[slots], np.concatenate([anchors, partners]))


@pytest.mark.parametrize("name", ["vse", "scan"])
def test_a_deduplicated_step_has_the_same_loss_and_gradients(small, name: str) -> None:
    """Issue 19: encoding each distinct image and caption once changes no number."""
    prepared, split, tables_path = small
    cfg = load_config(None, [*SMALL_SCENES, f"model.name={name}",
                             f"negatives.source=tables:{tables_path}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim).train()
    assert model.encodes_items_independently
    request = next(iter(GlobalBatchSampler(split.n_captions, 32, seed=1)))
    results = []
    for deduplicate in (False, True):
        dataset = PairDataset(split, sampling_range=50, tables=load_tables(tables_path),
                              draws="pair", deduplicate=deduplicate)
        batch = dataset.__getitems__(request)
        results.append((batch.regions.shape[0], batch.tokens.shape[0]))
        model.zero_grad(set_to_none=True)
        loss_fn = AOQLoss.from_config(cfg.loss)
        loss = loss_fn(*batch_scores(model, batch))
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in loss_fn.last_terms.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (rows_all, (loss_all, terms_all, grads_all), rows_distinct,
     (loss_distinct, terms_distinct, grads_distinct)) = results
    assert rows_all == (96, 96)
    assert rows_distinct[0] < 96 and rows_distinct[1] < 96  # the test dedups something
    torch.testing.assert_close(loss_distinct, loss_all, rtol=1e-6, atol=1e-6)
    assert terms_distinct.keys() == terms_all.keys()
    for term, value in terms_all.items():
        torch.testing.assert_close(terms_distinct[term], value, rtol=1e-6, atol=1e-6)
    scale = max(float(g.abs().max()) for g in grads_all.values())
    for param, grad in grads_all.items():
        torch.testing.assert_close(grads_distinct[param], grad, rtol=1e-5, atol=1e-6 * scale,
                                   msg=param)


def test_models_with_batch_statistics_encode_every_slot(small, tmp_path: Path) -> None:
    prepared, _, _ = small
    cfg = load_config(None, [*SMALL_SCENES, "model.name=vsrn", "model.caption_hidden=16",
                             "model.caption_word_dim=8"])
    session = TrainingSession(cfg, prepared, RunStorage(str(tmp_path), "run",
                                                        cfg.data.cache_dir))
    session.build()
    assert not session.core.encodes_items_independently and not session.dataset.deduplicate
    assert session.dataset.draws == "pair" and isinstance(session.sampler, GlobalBatchSampler)


# ----------------------------------------------------------------------------- 1 vs N ranks


def ranks_config(tables: str, *extra: str) -> Config:
    return load_config(None, [*SMALL_SCENES, f"negatives.source=tables:{tables}",
                              "loss.variant=aoq", *extra])


def rank_jobs(tables: str) -> dict[str, RankJob]:
    """aoq with offline negatives from the first step; a global batch of 32 pairs."""
    step = ("optim.grad_clip=0", "loss.max_violation_warmup_epochs=0")
    return {
        "vse": RankJob(ranks_config(tables, "optim.epochs=2"), tables),
        "scan": RankJob(ranks_config(tables, "model.name=scan",
                                     "loss.max_violation_warmup_epochs=0"), tables, steps=8),
        "vse_step": RankJob(ranks_config(tables, *step), tables, steps=1, gradients=True),
        "scan_step": RankJob(ranks_config(tables, "model.name=scan", *step), tables, steps=1,
                             gradients=True),
        # What 2 workers computed before global batches: each its own 16 pairs.
        "vse_step_per_worker": RankJob(ranks_config(tables, *step, "optim.batch_scope=worker",
                                                    "optim.batch_size=16"), tables, steps=1,
                                       gradients=True),
    }


@pytest.fixture(scope="module")
def two_ranks(small, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every job of :func:`rank_jobs` on 2 gloo ranks (started once for the module)."""
    prepared, _, tables = small
    jobs = rank_jobs(tables)
    results = spawn_jobs(2, free_ports(1)[0], prepared, tmp_path_factory.mktemp("ranks"),
                         list(jobs.values()))
    return dict(zip(jobs, results))


def one_rank(small, name: str, tmp: Path) -> dict[str, torch.Tensor]:
    """Job ``name`` of :func:`rank_jobs` in this process, with one thread as each rank."""
    prepared, _, tables = small
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_job(rank_jobs(tables)[name], 0, 1, prepared, tmp)
    finally:
        torch.set_num_threads(threads)


def initial_weights(small, name: str) -> dict[str, torch.Tensor]:
    prepared, _, tables = small
    cfg = rank_jobs(tables)[name].cfg
    torch.manual_seed(cfg.run.seed)  # as TrainingSession.build
    return build_model(cfg.model, prepared.vocab_size, prepared.feature_dim).state_dict()


@pytest.mark.parametrize("name", ["vse_step", "scan_step"])
def test_a_step_has_the_same_gradients_on_one_and_two_ranks(small, two_ranks, name: str,
                                                            tmp_path: Path) -> None:
    """The gathered step's gradient is the single-process one, scale included (Adam and
    gradient clipping would hide a wrong scale in the weights)."""
    one, two = one_rank(small, name, tmp_path), two_ranks[name]
    assert one.keys() == two.keys()
    for param, grad in one.items():
        torch.testing.assert_close(two[param], grad, rtol=1e-5,
                                   atol=1e-5 * float(grad.abs().max()), msg=param)
    if name == "vse_step":  # per-worker batches are another loss: far outside the bound
        old = two_ranks["vse_step_per_worker"]
        assert any(float((old[p] - g).abs().max()) > 0.01 * float(g.abs().max())
                   for p, g in one.items())


def test_the_default_model_trains_the_same_weights_on_one_and_two_ranks(
        small, two_ranks, tmp_path: Path) -> None:
    one = one_rank(small, "vse", tmp_path)
    assert max_difference(one, two_ranks["vse"]) <= TOLERANCE
    assert max_difference(one, initial_weights(small, "vse")) > 100 * TOLERANCE


def test_scan_trains_the_same_weights_on_one_and_two_ranks(small, two_ranks, tmp_path: Path
                                                           ) -> None:
    """scan gathers word encodings (of different lengths on each rank) and score rows.

    8 steps, not epochs: scan's training amplifies float noise (from near-ties of
    max-violation among an untrained model's close scores, and Adam's per-weight
    normalisation). After 8 steps 1 and 2 ranks are 7.5e-8 apart; after a 37-step epoch
    1e-4 to 5e-4, no more than one rank running the same sums in another order (every
    slot encoded vs distinct items: 1.5e-4)."""
    one, two = one_rank(small, "scan", tmp_path), two_ranks["scan"]
    assert max_difference(one, two) <= TOLERANCE
    assert max_difference(one, initial_weights(small, "scan")) > 100 * TOLERANCE


@pytest.mark.ray
@pytest.mark.e2e
def test_a_job_on_one_and_two_workers_ends_with_the_same_weights(
        tmp_path: Path, scenes_cache: Path, local_ray) -> None:
    """Ray Train end to end: aoq, its tables mined by the job (synchronously on rank 0,
    from the initial weights, which every worker count shares)."""
    final = {}
    for workers in (1, 2):
        run = train_small(tmp_path / f"w{workers}", scenes_cache, "loss.variant=aoq",
                          "optim.epochs=1", "negatives.source=mine",
                          "negatives.warmup_epochs=0", "negatives.refresh_every=0",
                          "negatives.pool_actors=0", f"run.num_workers={workers}",
                          f"run.name=w{workers}")
        assert run.run.info.status == "FINISHED"
        assert [v for _, v in run.history("negatives/table_version")] == [1]
        newest = sorted(run.output_dir.glob("checkpoint_*"))[-1]
        state = newest_complete_checkpoint(newest, workers).state
        assert state["epoch"] == 0
        final[workers] = state["model"]
    assert max_difference(final[1], final[2]) <= TOLERANCE
