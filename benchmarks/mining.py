"""Side-by-side timing of exact top-K candidate mining (results: docs/benchmarks.md §1).

Generates random L2-normalised fp32 embeddings (fixed seed) and times, on the same
inputs in one process:

  (a) bare products: the engine's own blocked GEMMs (same tiles, same padded layout),
      no selection: the floor any exact fp32 method pays;
  (b) faiss IndexFlatIP: search top-(K + cpi), then drop each image's own captions;
  (c) naive torch: full row-block products + torch.topk (--skip-naive to leave out);
  (d) this engine: i2t alone (``exact_topk``), t2i alone, and both tables in one pass
      (``mine_candidates``), in fp32 and, with --precisions, in tf32 / bf16 (the
      approximate modes report their overlap@K with the fp32 tables);
  (d0) with --baseline-tree: the engine of another source tree (e.g. an export of an
      older commit) on the same inputs, in a helper process that sits idle while the
      others run, so "before" and "after" are timed in one run; its tables must be
      identical to ours;
  (e) the authors' per-row loop on --author-subset rows (scores of one image against
      all captions, own captions set low, full numpy argsort, first K), extrapolated
      linearly to all images.

Methods are interleaved over --repeats rounds (A, B, C, A, B, C ...) and the best round
is reported with the median: the 2-core development box is shared and single runs
swing by 30%. With --device cuda every timing waits for the device (faiss, naive torch
and the authors' loop are CPU methods and are skipped); --json writes everything.

Examples::

    # the reference size on the 2-core box, before (an export of commit 3bf4328) / after
    python benchmarks/mining.py --n-images 10000 --captions-per-image 5 --dim 1024 \\
        --k 2000 --k-images 400 --seed 0 --author-subset 200 --threads 2 --repeats 5 \\
        --baseline-tree /work/scratch-perf/base
    # COCO's shape on one GPU (benchmarks/gpu.sh)
    python benchmarks/mining.py --device cuda --n-images 113287 --k 2000 --k-images 400 \\
        --precisions fp32 tf32 bf16 --repeats 1 --skip-faiss --skip-naive \\
        --author-subset 0 --block-rows 2048 --tile-cols 16384 --json OUT/mining.json
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import hashlib
import io
import pstats
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aoq.negatives import mine_candidates
from aoq.search import SearchOptions, exact_topk, overlap_at_k
from aoq.search.engine import block_rows_for, tile_plan

BARE = "(a) bare products"
BARE_WORKERS = "(a') bare products, 1 thread/worker"
FAISS = "(b) faiss IndexFlatIP i2t"
NAIVE = "(c) naive torch products+topk i2t"
I2T, T2I, BOTH = "(d) engine i2t", "(d) engine t2i", "(d) engine both tables"
BASE_I2T, BASE_BOTH = "(d0) baseline engine i2t", "(d0) baseline engine both tables"


def embeddings(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(n, d) L2-normalised float32 Gaussian rows (the baseline helper calls this too)."""
    x = torch.randn(n, d, generator=gen)
    return x / x.norm(dim=1, keepdim=True)


def make_inputs(n_images: int, cpi: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = embeddings(n_images, d, gen)
    return images, embeddings(cpi * n_images, d, gen)


def digest(*arrays: np.ndarray) -> str:
    """A short hash of index tables (to compare tables across processes)."""
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------- the methods


def bare_products(images: torch.Tensor, captions: torch.Tensor, block_rows: int | None,
                  tile_cols: int | None = None) -> None:
    """The engine's GEMMs (tiles and padded row stride as in the engine), nothing else."""
    br, nt = tile_plan(images.shape[0], captions.shape[0], False, block_rows, tile_cols,
                       SearchOptions())
    ld = 1 << (nt - 1).bit_length()
    buf = torch.empty(br * ld, device=images.device)
    for r0 in range(0, images.shape[0], br):
        q = images[r0:r0 + br]
        for c0 in range(0, captions.shape[0], nt):
            kt = captions[c0:c0 + nt]
            out = buf[: q.shape[0] * ld].view(q.shape[0], ld)[:, : kt.shape[0]]
            torch.mm(q, kt.T, out=out)
    sync(images.device)


def bare_products_workers(images: torch.Tensor, captions: torch.Tensor,
                          block_rows: int | None, n_workers: int) -> None:
    """The same tile GEMMs the way the engine runs them on CPU: whole row blocks taken
    by ``n_workers`` threads, torch single-threaded in each."""
    options = SearchOptions()
    # The engine's row blocks for n_workers (smaller than the default when that keeps
    # every worker busy to the end).
    br = tile_plan(images.shape[0], captions.shape[0], False,
                   block_rows_for(images.shape[0], n_workers, block_rows, options), None,
                   options)[0]
    starts = list(range(0, images.shape[0], br))
    lock = threading.Lock()

    def loop() -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            while True:
                with lock:
                    if not starts:
                        return
                    r0 = starts.pop()
                bare_products(images[r0:r0 + br], captions, br)
        finally:
            torch.set_num_threads(previous)

    threads = [threading.Thread(target=loop) for _ in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def faiss_i2t(index, images: np.ndarray, k: int, cpi: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss top-(k + cpi), own captions removed (order kept)."""
    scores, ids = index.search(images, k + cpi)
    own = (ids // cpi) == np.arange(len(images))[:, None]
    # A stable argsort of the "own" flag moves own captions to the end, order kept.
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def naive_torch(images: torch.Tensor, captions: torch.Tensor, k: int, cpi: int,
                block_rows: int) -> torch.Tensor:
    out = torch.empty(images.shape[0], k, dtype=torch.int64)
    for r0 in range(0, images.shape[0], block_rows):
        s = images[r0:r0 + block_rows] @ captions.T
        rows = torch.arange(s.shape[0])
        for t in range(cpi):
            s[rows, (r0 + rows) * cpi + t] = -torch.inf
        out[r0:r0 + s.shape[0]] = torch.topk(s, k, dim=1).indices
    return out


def authors_per_row(images: np.ndarray, captions: np.ndarray, k: int, cpi: int,
                    rows: int) -> float:
    """Seconds per image of the authors' loop (their mining script, vectorised per row)."""
    t0 = time.perf_counter()
    for i in range(rows):
        s = captions @ images[i]
        s[cpi * i: cpi * i + cpi] = -1e9
        np.argsort(-s)[:k]
    return (time.perf_counter() - t0) / rows


def identity_vs_faiss(ours: np.ndarray, our_scores: np.ndarray, theirs: np.ndarray,
                      their_scores: np.ndarray, atol: float = 1e-6) -> dict[str, float]:
    """How often our i2t rows equal faiss's: as sequences, as sets, and up to ties.

    Two fp32 GEMMs (MKL here, faiss's BLAS there) round differently in the last bits, so
    near-equal scores may swap. A row is equal "up to ties" when both score sequences
    (each from its own GEMM) agree to ``atol`` everywhere: then the rows differ only
    where scores are closer than fp32 rounding (neighbouring scores here are ~1e-5
    apart).
    """
    same_seq = np.all(ours == theirs, axis=1)
    same_set = np.all(np.sort(ours, axis=1) == np.sort(theirs, axis=1), axis=1)
    close = np.all(np.abs(our_scores - their_scores) <= atol, axis=1)
    return {
        "rows": float(len(ours)),
        "identical_sequence": float(same_seq.mean()),
        "identical_set": float(same_set.mean()),
        "identical_up_to_ties": float((same_seq | close).mean()),
        "max_score_difference": float(np.abs(our_scores - their_scores).max()),
    }


# ------------------------------------------------------------- the baseline helper

#: Runs in the helper process, with the baseline tree's ``aoq`` on its path. Inputs are
#: made by this file's own ``make_inputs`` (imported by path), so they are identical.
_HELPER = r"""
import importlib.util, json, sys, time
import torch
spec = importlib.util.spec_from_file_location("bench_inputs", sys.argv[1])
args = json.loads(sys.argv[2])
torch.set_num_threads(args["threads"])
from aoq.negatives import mine_candidates
from aoq.search import exact_topk
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
images, captions = bench.make_inputs(args["n_images"], args["cpi"], args["dim"], args["seed"])
cpi, k, k_i, br = args["cpi"], args["k"], args["k_images"], args["block_rows"]
exact_topk(images[:64], captions, k, positives=(1, cpi))  # warm-up, as in the parent
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    what = line.strip()
    t0 = time.perf_counter()
    if what == "i2t":
        out = exact_topk(images, captions, k, positives=(1, cpi), block_rows=br)[1:]
    else:
        out = mine_candidates(images, captions, k, k_i, cpi, block_rows=br)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "digest": bench.digest(*out)}), flush=True)
"""


class Baseline:
    """The engine of another source tree, in a helper process fed one call at a time."""

    def __init__(self, tree: Path, params: dict) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree / "platform")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HELPER, str(Path(__file__).resolve()), json.dumps(params)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._read()  # ready
        self.digests: dict[str, str] = {}

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline helper exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, what: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        self.digests[what] = reply["digest"]
        return reply["seconds"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


# ------------------------------------------------------------------- the report


def _row(name: str, times: list[float], n_rows: int, flop: float, faiss_t: float | None,
         bare_t: float | None) -> dict:
    best = min(times)
    return {"method": name, "best_s": round(best, 3),
            "median_s": round(statistics.median(times), 3),
            "rounds_s": [round(t, 3) for t in times], "rows_per_s": round(n_rows / best),
            "gflop_per_s": round(flop / best / 1e9, 1),
            "faster_than_faiss": round(faiss_t / best, 3) if faiss_t else None,
            "vs_bare": round(best / bare_t, 3) if bare_t else None}


def _fmt(r: dict) -> str:
    vf = f"{r['faster_than_faiss']:6.2f}x" if r["faster_than_faiss"] else "     -"
    vb = f"{r['vs_bare']:6.2f}x" if r["vs_bare"] else "     -"
    return (f"{r['method']:38s} {r['best_s']:8.2f} {r['median_s']:8.2f} {r['rows_per_s']:10d} "
            f"{r['gflop_per_s']:8.1f} {vf:>9s} {vb:>9s}")


def add_problem_arguments(p: argparse.ArgumentParser) -> None:
    """The problem's shape and seed (benchmarks/selection_floor.py takes the same)."""
    p.add_argument("--n-images", type=int, default=10000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=2000, help="K of i2t (captions per image)")
    p.add_argument("--k-images", type=int, default=400, help="K of t2i (images per caption)")
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precisions", nargs="+", default=["fp32"],
                   choices=["fp32", "tf32", "bf16"],
                   help="modes of (d) both tables; tf32 / bf16 report overlap@K with fp32")
    p.add_argument("--skip-naive", action="store_true", help="leave out (c) naive torch")
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--skip-single", action="store_true",
                   help="leave out (d) i2t alone and t2i alone")
    p.add_argument("--author-subset", type=int, default=200,
                   help="rows timed for (e) the authors' loop (0 skips it)")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads")
    p.add_argument("--block-rows", type=int, default=None)
    p.add_argument("--tile-cols", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best is shown)")
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="source tree (with platform/aoq) of the engine to compare with")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="instead of timing: profile i2t and both tables on the first ROWS "
                        "images, one worker, one thread (cProfile sees NumPy and torch calls "
                        "alike); with PYTHONPATH at another tree, profiles that engine")
    return p.parse_args(argv)


def profile(images: torch.Tensor, captions: torch.Tensor, rows: int, k: int, k_i: int,
            cpi: int) -> dict[str, list]:
    """Top functions by own time of one i2t and one two-table call (one worker, one
    thread) on ``rows`` images: (seconds, share of the call, calls, function)."""
    torch.set_num_threads(1)
    options = dataclasses.replace(SearchOptions(), use_workers=False)
    q = images[:rows]
    c = captions[: cpi * rows] if rows < images.shape[0] else captions
    calls = {"i2t": lambda: exact_topk(q, captions, k, positives=(1, cpi), options=options),
             "both tables": lambda: mine_candidates(q, c, k, min(k_i, rows - 1), cpi,
                                                    options=options)}
    out: dict[str, list] = {}
    for name, call in calls.items():
        call()  # warm-up
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        call()
        prof.disable()
        wall = time.perf_counter() - t0
        stats = pstats.Stats(prof, stream=io.StringIO())
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]
        out[name] = [(round(st[2], 3), round(st[2] / wall, 3), st[1],
                      f"{Path(fn[0]).name}:{fn[1]}({fn[2]})") for fn, st in top]
        print(f"profile, {name}, {rows} rows: {wall:.2f} s")
        for seconds, share, ncalls, fn in out[name]:
            print(f"  {seconds:8.3f} s {share:6.1%} {ncalls:6d}  {fn}")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = device.type == "cpu"
    faiss = None
    if on_cpu and not args.skip_faiss:
        import faiss  # noqa: PLC0415 (optional dependency)
        if args.threads:
            faiss.omp_set_num_threads(args.threads)

    cpi, n_i, d, k, k_i = (args.captions_per_image, args.n_images, args.dim, args.k,
                           args.k_images)
    n_c = cpi * n_i
    images, captions = make_inputs(n_i, cpi, d, args.seed)
    images_np, captions_np = images.numpy(), captions.numpy()
    images_dev, captions_dev = images.to(device), captions.to(device)
    flop = 2.0 * n_i * n_c * d
    br, tc = args.block_rows, args.tile_cols
    header = {
        "machine": f"{platform.platform()} | {platform.processor() or platform.machine()} | "
                   f"nproc {len(os.sched_getaffinity(0))} | torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads) | numpy {np.__version__}"
                   + (f" | faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)"
                      if faiss else "")
                   + (f" | {torch.cuda.get_device_name(device)}" if not on_cpu else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python benchmarks/mining.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
        "problem": f"{n_i} images x {n_c} captions x {d}-d fp32, K={k} (i2t), "
                   f"K_images={k_i} (t2i), seed {args.seed}, device {device}",
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    for key, value in header.items():
        print(f"{key}: {value}")
    sys.stdout.flush()
    if args.profile:
        report = {**header, "profile": profile(images, captions, args.profile, k, k_i, cpi)}
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
        return report

    results: dict[str, list[float]] = {}
    outputs: dict[str, object] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        results.setdefault(name, []).append(time.perf_counter() - t0)
        outputs[name] = out

    index = None
    if faiss is not None:
        index = faiss.IndexFlatIP(d)
        index.add(captions_np)
    baseline = None
    if args.baseline_tree is not None:
        baseline = Baseline(args.baseline_tree.resolve(), {
            "threads": torch.get_num_threads(), "n_images": n_i, "cpi": cpi, "dim": d,
            "seed": args.seed, "k": k, "k_images": k_i, "block_rows": br})

    stats: dict[str, dict] = {}

    def both(precision: str) -> Callable[[], object]:
        return lambda: mine_candidates(images_dev, captions_dev, k, k_i, cpi, block_rows=br,
                                       tile_cols=tc, precision=precision,
                                       stats=stats.setdefault(f"both {precision}", {}))

    methods: list[tuple[str, Callable[[], object]]] = [
        (BARE, lambda: bare_products(images_dev, captions_dev, br, tc))]
    if on_cpu:
        methods.append((BARE_WORKERS, lambda: bare_products_workers(
            images, captions, br, torch.get_num_threads())))
    if index is not None:
        methods.append((FAISS, lambda: faiss_i2t(index, images_np, k, cpi)))
    if on_cpu and not args.skip_naive:
        methods.append((NAIVE, lambda: naive_torch(images, captions, k, cpi, br or 1024)))
    if not args.skip_single:
        methods += [
            (I2T, lambda: exact_topk(images_dev, captions_dev, k, positives=(1, cpi),
                                     block_rows=br, tile_cols=tc,
                                     stats=stats.setdefault("i2t", {}))),
            (T2I, lambda: exact_topk(captions_dev, images_dev, k_i, positives=(cpi, 1),
                                     block_rows=br, tile_cols=tc)),
        ]
    methods.append((BOTH, both("fp32")))
    if baseline is not None:
        methods += [(BASE_I2T, lambda: baseline.run("i2t")),
                    (BASE_BOTH, lambda: baseline.run("both"))]
    once: list[tuple[str, Callable[[], object]]] = [
        (f"{BOTH}, {p}", both(p)) for p in args.precisions if p != "fp32"]

    # Warm-up (allocator, MKL/OpenMP pools, faiss, CUDA context) on a slice, then
    # interleaved rounds; the approximate modes are timed in the first round only.
    bare_products(images_dev[:256], captions_dev, br, tc)
    exact_topk(images_dev[:64], captions_dev, k, positives=(1, cpi), tile_cols=tc)
    for rep in range(args.repeats):
        for name, fn in methods + (once if rep == 0 else []):
            if name in (BASE_I2T, BASE_BOTH):
                results.setdefault(name, []).append(fn())  # timed in the helper
            else:
                timed(name, fn)
            print(f"  round {rep + 1}: {name:38s} {results[name][-1]:8.2f} s   (load "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
    if baseline is not None:
        baseline.close()

    author_s = None
    if on_cpu and args.author_subset:
        per_row = authors_per_row(images_np, captions_np.copy(), k, cpi,
                                  min(args.author_subset, n_i))
        author_s = per_row * n_i

    # The floor is the faster way of running the same tile GEMMs.
    bare_t = min(min(results[BARE]), min(results.get(BARE_WORKERS, results[BARE])))
    faiss_t = min(results[FAISS]) if FAISS in results else None
    rows = [_row(name, results[name], n_c if "t2i" in name else n_i, flop, faiss_t, bare_t)
            for name, _ in methods + once]
    if author_s is not None:
        rows.append(_row(f"(e) authors' per-row ({min(args.author_subset, n_i)} rows, "
                         "extrap.)", [author_s], n_i, flop, faiss_t, bare_t))
    print()
    print(f"{'method':38s} {'best s':>8s} {'median':>8s} {'rows/s':>10s} {'GFLOP/s':>8s} "
          f"{'vs faiss':>9s} {'vs bare':>9s}")
    for r in rows:
        print(_fmt(r))
    print("('vs faiss' = faiss time / this time, higher is faster; 'vs bare' = this time / "
          "bare products; GFLOP/s counts the 2*n_i*n_c*d products once, also for 'both')")

    checks = _checks(outputs, baseline, args, index is not None)
    for name, value in stats.items():
        print(f"engine counters, {name}: {value}")
    for key, value in checks.items():
        print(f"{key}: {value}")
    report = {**header, "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "results": rows, "checks": checks, "engine_counters": stats}
    print(f"load average at the end: {report['load_average_end']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


def _checks(outputs: dict, baseline: Baseline | None, args: argparse.Namespace,
            with_faiss: bool) -> dict:
    """Identity of the tables across methods, and overlap@K of the approximate modes."""
    checks: dict[str, object] = {}
    i2t, t2i = outputs[BOTH]
    checks["tables"] = f"i2t {i2t.dtype} {i2t.shape}, t2i {t2i.dtype} {t2i.shape}"
    if I2T in outputs:
        our_scores, ours_i2t = outputs[I2T]
        checks["both-tables i2t == i2t alone"] = bool(np.array_equal(i2t, ours_i2t))
        t2i_alone = outputs[T2I][1]
        checks["both-tables t2i == t2i alone"] = bool(np.array_equal(t2i, t2i_alone))
        if with_faiss:
            f_scores, f_ids = outputs[FAISS]
            checks["identity vs faiss (i2t rows)"] = identity_vs_faiss(
                ours_i2t, our_scores, f_ids, f_scores)
        if NAIVE in outputs:
            checks["naive torch vs engine, overlap@K"] = overlap_at_k(
                outputs[NAIVE].numpy(), ours_i2t)
    if baseline is not None:
        if "both" in baseline.digests:
            checks["baseline both tables identical"] = baseline.digests["both"] == digest(
                i2t, t2i)
        if "i2t" in baseline.digests and I2T in outputs:
            checks["baseline i2t identical"] = (
                baseline.digests["i2t"] == digest(outputs[I2T][1]))
    for p in args.precisions:
        if p != "fp32":
            a_i2t, a_t2i = outputs[f"{BOTH}, {p}"]
            checks[f"{p} overlap@K vs fp32"] = {"i2t": overlap_at_k(a_i2t, i2t),
                                                "t2i": overlap_at_k(a_t2i, t2i)}
    return checks


if __name__ == "__main__":
    main()
    raise SystemExit(0)
