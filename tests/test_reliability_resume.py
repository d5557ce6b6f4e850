"""Faults during training (reliability scenarios 1 to 5), end to end.

Every run here uses the same config and seed as one uninterrupted reference run, with
synchronous mining on rank 0 (``negatives.pool_actors=0``): the background refresh
switches tables at the first epoch boundary *after* a refresh finishes, which depends
on wall time, so only the synchronous schedule makes a killed run's final weights a
pure function of the config. Faults are real: a Ray Train worker process or the driver
is SIGKILLed from outside, a checkpoint file is truncated on disk.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from aoq.cluster.job import TrainingFailed, run_training
from aoq.training.checkpoint import CheckpointError, load_checkpoint, load_file

from conftest import (
    joining_env, killing, seed_store, signal_driver_when, small_config, small_overrides,
    store_client, train_small, used_versions, wait_gone,
)

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4
SYNC = ["loss.variant=aoq", "negatives.source=mine", f"optim.epochs={EPOCHS}",
        "negatives.warmup_epochs=1", "negatives.refresh_every=1", "negatives.pool_actors=0"]


# ----------------------------------------------------------------------------- helpers


def complete_epochs(run_dir: Path) -> set[int]:
    """Epochs with a complete checkpoint (state and both ranks' RNG) in storage."""
    epochs = set()
    for directory in run_dir.glob("checkpoint_*"):
        try:
            epochs.add(int(load_checkpoint(directory, world=2).state["epoch"]))
        except CheckpointError:
            pass  # being written right now, or damaged
    return epochs


def final_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model of the last epoch's newest complete checkpoint, best_model.pt's model)."""
    last = []
    for directory in sorted(run_dir.glob("checkpoint_*"), key=lambda p: p.name):
        try:
            state = load_checkpoint(directory, world=2).state
        except CheckpointError:
            continue
        if state["epoch"] == EPOCHS - 1:
            last.append(state["model"])
    assert last, sorted(p.name for p in run_dir.iterdir())
    return last[-1], load_file(run_dir / "best_model.pt")["model"]


def assert_same_weights(got, expected) -> None:
    for got_state, expected_state in zip(got, expected):
        assert got_state.keys() == expected_state.keys()
        for key in expected_state:
            assert torch.equal(got_state[key], expected_state[key]), key


def after_checkpoint(run_dir: Path, epoch: int) -> bool:
    """Rank 0 has started ``epoch + 1`` and the checkpoint of ``epoch`` is complete."""
    return (any(x["epoch"] == epoch + 1 for x in used_versions(run_dir, 0))
            and epoch in complete_epochs(run_dir))


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ----------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, scenes_cache: Path, private_ray):
    """One uninterrupted run: its config, outcome, final weights and dev history."""
    small = train_small(tmp_path_factory.mktemp("reference"), scenes_cache, *SYNC,
                        "run.name=ref")
    return {"tmp": small.tmp, "cfg": small.cfg, "outcome": small.outcome,
            "run_dir": small.output_dir, "weights": final_weights(small.output_dir),
            "dev": small.history("dev/rsum")}


# ----------------------------------------------------------------------------- scenario 1


def test_worker_sigkilled_after_a_checkpoint_resumes_bit_exactly(
        reference, tmp_path: Path, scenes_cache: Path) -> None:
    cfg = small_config(tmp_path, scenes_cache, *SYNC, "run.name=killed", "run.max_failures=1")
    seed_store(tmp_path)
    run_dir = Path(cfg.run.storage) / "killed"

    def rank0_after_epoch_1_checkpoint() -> list[int]:
        return [used_versions(run_dir, 0)[-1]["pid"]] if after_checkpoint(run_dir, 1) else []

    with killing(rank0_after_epoch_1_checkpoint) as killed:
        outcome = run_training(cfg)

    assert len(killed) == 1
    lines = used_versions(run_dir, 0)
    before = [x["epoch"] for x in lines if x["pid"] == killed[0]]
    after = [x["epoch"] for x in lines if x["pid"] != killed[0]]
    assert before[:3] == [0, 1, 2]
    # The new worker group continued from a checkpoint (epoch >= 1), not from scratch.
    assert after and after[0] >= 2 and after == list(range(after[0], EPOCHS)), lines
    assert_same_weights(final_weights(run_dir), reference["weights"])
    client = store_client(tmp_path)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    # Bit-exact training gives the reference's dev scores, each epoch logged once.
    assert history(client, outcome.run_id, "dev/rsum") == reference["dev"]
    # Every table version was mined from the same weights as the reference's.
    for version in ("v0001", "v0002", "v0003"):
        for name in ("i2t.npy", "t2i.npy"):
            assert (run_dir / "negatives" / version / name).read_bytes() == (
                reference["run_dir"] / "negatives" / version / name).read_bytes()


# ----------------------------------------------------------------------------- scenario 2


def test_an_exhausted_failure_budget_fails_clearly_after_exactly_max_failures_plus_one(
        tmp_path: Path, scenes_cache: Path, private_ray) -> None:
    cfg = small_config(tmp_path, scenes_cache, *SYNC, "run.name=doomed", "run.max_failures=1")
    seed_store(tmp_path)
    run_dir = Path(cfg.run.storage) / "doomed"
    every_rank1_attempt = lambda: [x["pid"] for x in used_versions(run_dir, 1)]  # noqa: E731
    with killing(every_rank1_attempt, once=False) as killed, \
            pytest.raises(TrainingFailed) as info:
        run_training(cfg)

    message = str(info.value)
    assert "failed on all 2 attempt(s) allowed by run.max_failures=1" in message
    assert "'doomed'" in message
    attempts = {x["pid"] for x in used_versions(run_dir, 1)}
    assert len(attempts) == 2 and attempts == set(killed)
    assert len({x["pid"] for x in used_versions(run_dir, 0)}) == 2
    client = store_client(tmp_path)
    experiment = client.get_experiment_by_name("aoq")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"


# ----------------------------------------------------------------------------- scenario 3


def test_a_killed_driver_resubmitted_with_the_same_name_continues_its_run(
        reference, tmp_path: Path, scenes_cache: Path) -> None:
    command = [sys.executable, str(ROOT / "jobs" / "train.py"),
               *small_overrides(tmp_path, scenes_cache, *SYNC, "run.name=resubmitted")]
    run_dir = tmp_path / "runs" / "resubmitted"
    seed_store(tmp_path)
    env = joining_env()  # the module's Ray, as a cluster outlives the drivers it runs
    signal_driver_when(command, lambda: after_checkpoint(run_dir, 1), signal.SIGKILL,
                       log=tmp_path / "first.log", cwd=tmp_path, env=env)
    first_attempt = {x["pid"] for x in used_versions(run_dir, 0) + used_versions(run_dir, 1)}
    wait_gone(first_attempt)  # the job's workers die with their driver

    client = store_client(tmp_path)
    (stale,) = client.search_runs([client.get_experiment_by_name("aoq").experiment_id])
    assert stale.info.status == "RUNNING"  # what a SIGKILL leaves behind
    done_before = max(complete_epochs(run_dir))

    resumed = subprocess.run(command, capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    (run,) = client.search_runs([client.get_experiment_by_name("aoq").experiment_id])
    assert run.info.run_id == stale.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["aoq.resumed"] == "true"
    assert run.data.tags["aoq.recovered_stale_run"] == "true"
    # No epoch repeated: each logged once, with the reference's values.
    assert history(client, run.info.run_id, "dev/rsum") == reference["dev"]
    second = [x["epoch"] for x in used_versions(run_dir, 0) if x["pid"] not in first_attempt]
    assert second == list(range(done_before + 1, EPOCHS))
    assert_same_weights(final_weights(run_dir), reference["weights"])


# ----------------------------------------------------------------------------- scenario 4


def test_mining_that_fails_for_good_keeps_training_on_the_old_tables(
        tmp_path: Path, scenes_cache: Path, private_ray) -> None:
    """Synchronous mining on rank 0 cannot publish version 2: a foreign file occupies
    its place, as any lasting error would (the pool's version of this, with its actors
    killed, is test_async_refresh_e2e.py::test_a_permanently_failing_pool_...)."""
    cfg = small_config(tmp_path, scenes_cache, *SYNC, "run.name=stuck")
    seed_store(tmp_path)
    run_dir = Path(cfg.run.storage) / "stuck"
    (run_dir / "negatives").mkdir(parents=True)
    (run_dir / "negatives" / "v0002").write_text("not a table version")
    outcome = run_training(cfg)

    client = store_client(tmp_path)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and "test/rsum" in outcome.test_metrics
    warning = run.data.tags["aoq.warning.refresh"]
    assert "mining table version 2: DataError" in warning and "v0002" in warning
    failures = dict(history(client, outcome.run_id, "negatives/refresh_failures"))
    assert failures == {0: 0.0, 1: 0.0, 2: 1.0, 3: 2.0}  # tried again each due epoch
    for rank in (0, 1):  # every rank stayed on version 1 together
        assert [x["version"] for x in used_versions(run_dir, rank)] == [0, 1, 1, 1]


# ----------------------------------------------------------------------------- scenario 5


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(reference) -> None:
    """Runs last: it damages the reference run's newest checkpoint and resumes it."""
    run_dir, cfg = reference["run_dir"], reference["cfg"]
    latest = max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    state = latest / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    previous_pids = {x["pid"] for x in used_versions(run_dir, 0)}

    outcome = run_training(cfg)  # same name: Ray hands over the damaged checkpoint

    client = store_client(reference["tmp"])
    run = client.get_run(outcome.run_id)
    assert outcome.run_id == reference["outcome"].run_id and run.info.status == "FINISHED"
    warning = run.data.tags["aoq.warning.checkpoint"]
    assert latest.name in warning and "state.pt" in warning and "unreadable" in warning
    # Only the last epoch was trained again, from the previous checkpoint ...
    again = [x["epoch"] for x in used_versions(run_dir, 0) if x["pid"] not in previous_pids]
    assert again == [EPOCHS - 1]
    # ... and it gave the same weights as before the damage.
    assert_same_weights(final_weights(run_dir), reference["weights"])
