"""The measuring tools in benchmarks/, run tiny on CPU: the mining benchmark (every
precision, and the before/after helper process), the default-job process-tree sampler,
the step benchmark's FLOP accounting, and the GPU script's fail-fast check and report
merge. They produce the figures in
docs/benchmarks.md; what they measure is never asserted here, only that they measure
the right processes and tables."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """The benchmark scripts, importable by name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield {name: importlib.import_module(name)
               for name in ("mining", "default_job", "gpu_report", "selection_floor",
                            "step_versions")}
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


# ------------------------------------------------------------------ mining benchmark


def test_mining_benchmark_checks_every_mode_and_the_baseline(bench, tmp_path: Path) -> None:
    # This checkout as its own "baseline tree": the helper process must rebuild the very
    # same inputs and produce the very same tables.
    report = bench["mining"].main([
        "--n-images", "120", "--dim", "16", "--k", "30", "--k-images", "12", "--repeats", "1",
        "--author-subset", "5", "--threads", "1", "--precisions", "fp32", "tf32", "bf16",
        "--baseline-tree", str(ROOT), "--json", str(tmp_path / "m.json")])
    checks = report["checks"]
    assert checks["baseline both tables identical"] is True
    assert checks["baseline i2t identical"] is True
    assert checks["both-tables i2t == i2t alone"] is True
    assert checks["both-tables t2i == t2i alone"] is True
    assert checks["identity vs faiss (i2t rows)"]["identical_up_to_ties"] == 1.0
    for precision in ("tf32", "bf16"):
        overlap = checks[f"{precision} overlap@K vs fp32"]
        assert 0.0 < overlap["i2t"] <= 1.0 and 0.0 < overlap["t2i"] <= 1.0
    methods = {r["method"] for r in report["results"]}
    assert {"(d) engine both tables, tf32", "(d) engine both tables, bf16",
            "(d0) baseline engine both tables"} <= methods
    assert json.loads((tmp_path / "m.json").read_text())["checks"] == json.loads(
        json.dumps(checks))


def test_selection_floor_masks_exactly_the_k_best_of_each_row_and_column(
        bench, tmp_path: Path) -> None:
    # 60 images x 300 captions fit one tile: the final thresholds must let through
    # exactly K scores per row and K per column (random scores have no ties).
    report = bench["selection_floor"].main([
        "--n-images", "60", "--dim", "16", "--k", "25", "--k-images", "7", "--repeats", "1",
        "--threads", "1", "--json", str(tmp_path / "f.json")])
    assert report["shape"]["tiles"] == 1
    assert report["hits_in_timed_tiles"] == {"rows": 60 * 25, "columns": 300 * 7, "tiles": 1}
    assert json.loads((tmp_path / "f.json").read_text())["floor_ratio"] == report["floor_ratio"]


def test_mining_profile_names_the_selection_steps(bench) -> None:
    report = bench["mining"].main(["--n-images", "200", "--dim", "16", "--k", "40",
                                   "--k-images", "10", "--profile", "100"])
    for call in ("i2t", "both tables"):
        rows = report["profile"][call]
        # At this tiny size selection, not the products, fills the top of the profile
        # (which of the products' frames make the top 15 depends on timing).
        assert len(rows) == 15 and any(step in row[3] for row in rows
                                       for step in ("_select", "partition", "nonzero")), rows
        assert sum(row[1] for row in rows) <= 1.0 and all(row[2] >= 1 for row in rows)


def test_mining_benchmark_refuses_cuda_without_a_device(bench) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench["mining"].main(["--device", "cuda", "--n-images", "10"])


# ------------------------------------------------------------- default-job sampler


@pytest.mark.parametrize(("cmdline", "root", "kind"), [
    ("python jobs/train.py", True, "driver"),
    ("ray::RayTrainWorker", False, "train worker"),
    ("ray::MiningWorker.embed", False, "mining actor"),
    ("ray::TrainController.run", False, "train controller"),
    ("ray::IDLE", False, "ray idle worker"),
    ("ray::PlacementGroupCleaner", False, "ray worker (other)"),
    ("/site-packages/ray/core/src/ray/gcs/gcs_server --x=1", False, "ray gcs"),
    ("/site-packages/ray/core/src/ray/raylet/raylet --y", False, "ray raylet"),
    ("python -u /site-packages/ray/_private/log_monitor.py", False, "ray log monitor"),
    ("python /site-packages/ray/dashboard/dashboard.py --host=127.0.0.1", False,
     "ray dashboard"),
    ("ray-dashboard-NodeHead-0 (python -c from multiprocessing)", False,
     "ray dashboard modules"),
    ("ray::DashboardAgent", False, "ray dashboard agent"),
    ("/site-packages/ray/core/src/ray/something_new", False, "ray (other)"),
    ("python -c b = bytearray(10)", False, "other"),
])
def test_processes_are_classified_by_command_line(bench, cmdline: str, root: bool,
                                                  kind: str) -> None:
    assert bench["default_job"].classify(cmdline, root) == kind


def test_sampler_sums_the_whole_process_tree(bench) -> None:
    # A parent that starts a child holding 64 MiB of touched private memory: the tree's
    # PSS must include the child's, and both processes must be seen.
    code = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', "
            "'import time; b = bytearray(64 << 20); time.sleep(30)']); "
            "time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        sampler = bench["default_job"].TreeSampler(proc.pid)
        deadline = time.monotonic() + 20
        sample = sampler.sample(0.0)
        while sample["Pss"] < 64 and time.monotonic() < deadline:
            time.sleep(0.2)
            sample = sampler.sample(0.0)
        assert sample["processes"] == 2
        assert sample["Pss"] >= 64 and sample["Pss_Anon"] >= 64
        assert sample["kinds"]["driver"]["processes"] == 1
        assert sample["kinds"]["other"]["Pss"] >= 64
        sampler.samples.append(sample)
        summary = sampler.summary()
        assert summary["peak_pss_mib"] >= 64 and summary["max_processes"] == 2
        assert set(summary["cpu_seconds"]) == {"driver", "other"}
    finally:
        for pid in bench["default_job"].descendants(proc.pid,
                                                    bench["default_job"].process_table()[0]):
            if pid != proc.pid:
                os.kill(pid, 9)
        proc.kill()
        proc.wait()


def test_default_job_variants_are_checked(bench, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench["default_job"].main(["--out", str(tmp_path / "a"), "--variant", f"x={tmp_path}"])
    with pytest.raises(SystemExit):
        bench["default_job"].main(["--out", str(tmp_path / "b"), "--variant", f"x={ROOT}",
                                   "--variant-env", "y:A=1"])


# ------------------------------------------------------------------ step benchmark


def test_step_flops_count_the_backward_products(bench) -> None:
    step_versions = bench["step_versions"]
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(32, 16)
    forward = 2 * 32 * 16 * 8
    # The weight's gradient is one more product of the forward's size; the input's
    # gradient, when the input needs one, a third.
    assert step_versions.step_flops(lambda: layer(x).sum().backward()) == 2 * forward
    x.requires_grad_(True)
    assert step_versions.step_flops(lambda: layer(x).sum().backward()) == 3 * forward
    assert 0 < step_versions.gemm_ceiling_gflops(size=64, repeats=2) < 1e6

    rows = [{"gemm_ceiling_gflops": c, "triplet": {"gflop": 6.0, "cpu_ms": t},
             "aoq": {"gflop": 18.0, "cpu_ms": a}}
            for c, t, a in ((100.0, 100.0, 300.0), (80.0, 120.0, 400.0), (90.0, 90.0, 350.0))]
    summary = step_versions.flop_summary(rows)
    assert summary["gemm_ceiling_gflops"] == 90.0
    assert summary["triplet_gflops"] == pytest.approx(60.0)  # 6 GFLOP in the median 100 ms
    assert summary["aoq_share_of_ceiling"] == pytest.approx(18.0 / 0.35 / 90.0)
    assert summary["aoq_vs_triplet_at_equal_flop_rates"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------- gpu.sh


def test_gpu_script_stops_at_once_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "CUDA" in lines[0]
    assert not (tmp_path / "out" / "pieces.tsv").exists()  # nothing ran


def test_gpu_report_keeps_failed_and_timed_out_pieces(bench, tmp_path: Path) -> None:
    (tmp_path / "pieces.tsv").write_text(
        "preflight\t0\t0\nprepare\t0\t12.5\ndefault_job\t0\t140.0\nstep\t124\t150.0\n"
        "mining\t1\t30.25\n")
    (tmp_path / "preflight.json").write_text(json.dumps({"torch": "x"}))
    (tmp_path / "default_job").mkdir()
    (tmp_path / "default_job" / "results.json").write_text(json.dumps({"jobs": [1]}))
    (tmp_path / "mining.json").write_text("{not json")
    assert bench["gpu_report"].main([str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_results.json").read_text())
    pieces = report["pieces"]
    assert report["total_seconds"] == pytest.approx(332.8)
    assert pieces["default_job"]["results"] == {"jobs": [1]}
    assert pieces["step"]["timed_out"] and "was not written" in pieces["step"]["results_error"]
    assert pieces["mining"]["exit_code"] == 1 and "mining.json" in pieces["mining"]["results_error"]


# ------------------------------------------------------------------ search kernels


def test_kernels_match_torch_on_strided_views() -> None:
    from aoq.search.kernels import HitMask, gather, kth_largest, put_rows, sort_unique

    gen = torch.Generator().manual_seed(0)
    buf = torch.randn(6 * 16, generator=gen)
    hits = HitMask(6, 16, torch.device("cpu"))
    # Sparse and dense masks take NumPy's two scanning paths (below and above 10% set);
    # the narrower tile after the wide ones checks that stale hits in padding are cleared.
    for width in (11, 11, 11, 16, 9):
        scores = buf.view(6, 16)[:, :width]  # a padded tile, as the engine lays it out
        for threshold in (torch.randn(6, 1, generator=gen), torch.randn(width, generator=gen),
                          torch.full((6, 1), 1.8), torch.full((6, 1), 9.0)):
            got = hits.hits(scores, threshold, 16)
            expected = torch.zeros(6, 16, dtype=torch.bool)
            expected[:, :width] = scores >= threshold
            assert torch.equal(got, expected.view(-1).nonzero().view(-1)), (width, threshold)
            assert got.dtype == torch.int64
    source = torch.arange(100, 200)
    positions = torch.tensor([5, 0, 89, 5])
    assert torch.equal(gather(source[10:], positions), torch.tensor([115, 110, 199, 115]))
    out = torch.zeros(5, 3, dtype=torch.int32)
    put_rows(out, torch.tensor([4, 1]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert out.tolist() == [[0, 0, 0], [4, 5, 6], [0, 0, 0], [0, 0, 0], [1, 2, 3]]
    ties = torch.randint(-3, 4, (40, 30), generator=gen).float()  # many equal values
    ties[0, :5] = -torch.inf  # excluded entries of the band
    before = ties.clone()
    scratch = torch.empty(40 * 30)
    for dim in (0, 1):
        for r in (1, 7, ties.shape[dim]):
            expected = torch.topk(ties, r, dim=dim).values.amin(dim=dim)
            assert torch.equal(kth_largest(ties, r, dim), expected), (dim, r)
            assert torch.equal(kth_largest(ties[:, :], r, dim, scratch), expected), (dim, r)
    assert torch.equal(ties, before)  # the caller's scores are never reordered
    values = np.unique(np.random.default_rng(1).integers(0, 1 << 40, 1000))
    keys = torch.from_numpy(np.random.default_rng(2).permutation(values))
    expected = torch.sort(keys).values
    assert torch.equal(sort_unique(keys), expected)
    assert torch.equal(keys, expected)  # in place
