"""What a newcomer reads: the warm-up epoch's loss is logged apart so loss charts stay
readable, and Ray's own chatter stays off the console while aoq's lines and real errors
still show."""

from __future__ import annotations

import time

import pytest
import torch

from aoq.cluster.console import ConsoleFilter, is_ray_internal, set_verbose
from aoq.cluster.train_loop import warmup_apart
from aoq.losses import AOQLoss, OfflineScores

# ------------------------------------------------------------------ the warm-up epoch


def random_batch(b: int = 8) -> tuple[torch.Tensor, OfflineScores]:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(b, b, generator=g) * 2 - 1
    offline = OfflineScores(*(torch.rand(b, generator=g) * 2 - 1 for _ in range(4)))
    return scores, offline


@pytest.mark.parametrize("variant", ["triplet", "aoq"])
def test_a_warm_up_loss_also_reports_its_hardest_negative_terms(variant: str) -> None:
    scores, offline = random_batch()
    offline = offline if variant != "triplet" else None
    summed = AOQLoss(variant, max_violation=False)
    hardest = AOQLoss(variant, max_violation=True)
    summed(scores, offline)
    hardest(scores, offline)
    for term in ("online_image_anchor", "online_caption_anchor"):
        # The same batch under max-violation: what every later epoch logs.
        assert float(summed.last_terms[f"hardest_{term}"]) == pytest.approx(
            float(hardest.last_terms[term]))
        assert float(summed.last_terms[term]) > float(hardest.last_terms[term])
    assert not any(k.startswith("hardest_") for k in hardest.last_terms)
    # The hardest terms are for logging: the loss optimised is the sum over negatives.
    assert float(summed(scores, offline)) == pytest.approx(sum(
        float(v) for k, v in summed.last_terms.items()
        if not k.startswith(("hardest_", "weight_"))))


def test_warm_up_epochs_log_their_summed_loss_apart() -> None:
    warm = {"epoch": 0, "train/loss": 2700.0, "train/online_image_anchor": 1400.0,
            "train/online_caption_anchor": 1290.0, "train/auxiliary": 10.0,
            "train/hardest_online_image_anchor": 30.0,
            "train/hardest_online_caption_anchor": 25.0, "dev/rsum": 90.0}
    out = warmup_apart(warm)
    assert out["warmup/loss"] == 2700.0 and out["warmup/online_image_anchor"] == 1400.0
    assert out["warmup/online_caption_anchor"] == 1290.0
    assert out["train/online_image_anchor"] == 30.0
    assert out["train/online_caption_anchor"] == 25.0
    assert out["train/loss"] == pytest.approx(30.0 + 25.0 + 10.0)
    assert out["dev/rsum"] == 90.0 and not any("hardest" in k for k in out)
    later = {"epoch": 1, "train/loss": 12.0, "train/online_image_anchor": 6.0,
             "train/online_caption_anchor": 6.0}
    assert warmup_apart(later) == later


# ------------------------------------------------------------------ the console

# Lines as Ray prints them on the console (recorded from real runs on this machine).
RAY_CHATTER = [
    "[2026-12-02 10:55:05,919 E 10225 10269] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'b101a98c3db15b5930bdcccb01000000' has constructor "
    "arguments in the object store and max_restarts > 0.",
    "2026-12-02 10:54:54,918\tWARNING authentication_token_setup.py:85 -- Token "
    "authentication is enabled for this Ray cluster.",
    "*** SIGTERM received at time=1796210158 on cpu 1 ***",
    "PC: @     0x7ff176aa3f16  (unknown)  (unknown)",
    "    @     0x7ff176a5a050  (unknown)  (unknown)",
    "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so "
    "the task will be retried. Error: The actor is dead because it was killed by `ray.kill`.",
]
RAY_TRACEBACK = """\
Exception in thread PlacementGroupCleanerMonitor:
Traceback (most recent call last):
  File "/usr/lib/python3.11/threading.py", line 1045, in _bootstrap_inner
    self.run()
  File "/site-packages/ray/train/v2/_internal/execution/controller/placement_group_cleaner.py", line 80, in _monitor_loop
    alive = is_actor_alive(
            ^^^^^^^^^^^^^^^
  File "/site-packages/ray/_private/services.py", line 759, in canonicalize_bootstrap_address_or_die
    raise ConnectionError(
ConnectionError: Found multiple active Ray instances: {'192.0.2.2:36897', '192.0.2.2:38995'}.""".splitlines()
AOQ_TRACEBACK = """\
Error in training function:
Traceback (most recent call last):
  File "/site-packages/ray/train/v2/_internal/execution/worker_group/thread_runner.py", line 30, in run
    result = target()
  File "/work/platform/aoq/training/session.py", line 212, in run_epoch
    stats = train_epoch(self.model, self.loader, loss_fn, self.optimizer,
FloatingPointError: training loss became nan; lower optim.lr or check the data

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/site-packages/ray/train/v2/_internal/execution/controller.py", line 88, in poll
ray.train.WorkerGroupError: Training failed due to worker errors""".splitlines()


def test_ray_chatter_is_dropped_and_aoq_lines_and_errors_kept() -> None:
    console = ConsoleFilter()
    aoq_lines = ["epoch 1/10 step 19/79 loss 4082.223 (937 pairs/s)",
                 "table version 1 ready in 5.1s", "Requesting resources: {'CPU': 1.0} * 2"]
    assert all(is_ray_internal(line) for line in RAY_CHATTER)
    assert not any(is_ray_internal(line) for line in aoq_lines)
    shown = console.lines("w1", [aoq_lines[0], *RAY_CHATTER, *RAY_TRACEBACK, *aoq_lines[1:]])
    assert shown == aoq_lines
    # An error raised in aoq code shows whole, with what it caused.
    assert console.lines("w1", [*AOQ_TRACEBACK, "next line"]) == [*AOQ_TRACEBACK, "next line"]


def test_a_traceback_split_across_batches_is_judged_whole() -> None:
    console = ConsoleFilter()
    traceback = AOQ_TRACEBACK[1:]
    assert console.lines("a", traceback[:3]) == []  # held back: not finished yet
    assert console.lines("b", ["another source"]) == ["another source"]
    assert console.lines("a", traceback[3:6]) == traceback[:6]
    assert console.lines("a", ["Exception in thread T:", "a plain line"]) == [
        "Exception in thread T:", "a plain line"]


def test_verbose_brings_ray_s_output_back() -> None:
    from aoq.cli import config_parser
    from aoq.cluster.console import is_verbose

    parser = config_parser("a job")
    try:
        assert parser.parse_args(["optim.epochs=2"]).verbose is False and not is_verbose()
        assert parser.parse_args(["--verbose", "optim.epochs=2"]).verbose is True
        assert is_verbose()  # and every process the job starts inherits it (AOQ_VERBOSE)
    finally:
        set_verbose(False)


@pytest.mark.ray
def test_the_driver_console_drops_what_ray_workers_print_of_ray(local_ray, capfd) -> None:
    import ray

    from aoq.cluster.console import after_ray_init

    set_verbose(False)
    after_ray_init()

    @ray.remote(num_cpus=0)
    def chatter(tag: str) -> None:
        print(RAY_CHATTER[0], flush=True)
        print("\n".join(RAY_TRACEBACK), flush=True)
        print(f"aoq line {tag}", flush=True)

    ray.get(chatter.remote("one"))
    out = ""
    deadline = time.monotonic() + 60  # a hang guard: worker output is streamed
    while "aoq line one" not in out and time.monotonic() < deadline:
        time.sleep(0.2)
        out += capfd.readouterr().out
    assert "aoq line one" in out
    assert "core_worker.cc" not in out and "PlacementGroupCleanerMonitor" not in out
