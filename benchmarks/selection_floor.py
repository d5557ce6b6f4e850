"""The least selection any exact two-table pass must do on CPU, timed primitive by
primitive (results: docs/benchmarks.md §1, "How close 1.3× can get").

Mining both tables in one pass has to (1) compute every product, (2) find, in each
tile, the scores at or above a row's and a column's threshold, and (3) hand back each
row's and each column's K best in rank order. This script times (1) as the engine runs
it (its tiles, whole row blocks per worker thread: (a') of benchmarks/mining.py, on the
same inputs), and the cheapest form of (2) and (3) with the fastest CPU primitives
(``aoq.search.kernels`` lists them): one ``scores >= threshold`` mask and one scan of
it for its hits (``HitMask``, the engine's own) per tile and direction, given the
*final* thresholds for free (a real
pass must first estimate them), and one ``argsort`` of the finished (rows, K) and
(columns, K) tables. No bookkeeping, no merging across tiles. The sum is a floor,
not an implementation: what it says is whether a selection built from these
primitives can fit in the budget the goal leaves, ``(ratio - 1) x products``.

Example (the reference size of benchmarks/mining.py)::

    python benchmarks/selection_floor.py --n-images 10000 --captions-per-image 5 \\
        --dim 1024 --k 2000 --k-images 400 --threads 2 --json floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from aoq.search import SearchOptions
from aoq.search.engine import block_rows_for, tile_plan
from aoq.search.kernels import HitMask
from mining import add_problem_arguments, bare_products_workers, make_inputs


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_arguments(p)
    p.add_argument("--threads", type=int, default=2,
                   help="worker threads for the products, as the engine runs them; the "
                        "selection floor is divided by this too, as if it ran on every "
                        "core at once")
    p.add_argument("--ratio", type=float, default=1.3, help="the goal: both tables in "
                   "at most RATIO x the bare products")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    n_q, n_k = args.n_images, args.n_images * args.captions_per_image
    # The mining benchmark's inputs for the same arguments.
    q, kk = make_inputs(n_q, args.captions_per_image, args.dim, args.seed)
    options = SearchOptions()
    # The engine's tiles for a two-direction search on this many threads.
    br, tc = tile_plan(n_q, n_k, True, block_rows_for(n_q, args.threads, None, options),
                       None, options)
    tiles = [(r0, c0) for r0 in range(0, n_q, br) for c0 in range(0, n_k, tc)]

    # The exact final thresholds (K-th best of each row and column), from one full
    # matrix: given to the floor for free.
    full = (q @ kk.T).numpy()
    row_best = np.partition(full, n_k - args.k, axis=1)[:, n_k - args.k:]
    col_best = np.partition(full.T, n_q - args.k_images, axis=1)[:, n_q - args.k_images:]
    # The K-th best sits where the partition put it: first of each kept block.
    row_th = np.ascontiguousarray(row_best[:, :1])
    col_th = np.ascontiguousarray(col_best[:, 0][None, :])
    row_best, col_best = row_best.copy(), col_best.copy()
    del full

    def products() -> None:
        bare_products_workers(q, kk, None, args.threads)

    tile_scores = {t: (q[t[0]:t[0] + br] @ kk[t[1]:t[1] + tc].T).numpy() for t in tiles[:4]}

    hits = {"rows": 0, "columns": 0}

    def masks(rows: bool) -> float:
        """Mask and positions, per tile, over every tile (timed on up to 4 real tiles
        and scaled by the tile count, to keep the whole matrix out of memory)."""
        total = 0.0
        for (r0, c0), s in tile_scores.items():
            th = row_th[r0:r0 + s.shape[0]] if rows else col_th[:, c0:c0 + s.shape[1]]
            scores, threshold = torch.from_numpy(s), torch.from_numpy(th)
            mask = HitMask(s.shape[0], s.shape[1], scores.device)
            total += best_of(lambda: mask.hits(scores, threshold, s.shape[1]), args.repeats)
            hits["rows" if rows else "columns"] += int(mask.hits(scores, threshold,
                                                                 s.shape[1]).numel())
        return total / len(tile_scores) * len(tiles)

    t_products = best_of(products, args.repeats)  # (a') of the mining benchmark
    t_row_masks, t_col_masks = masks(True), masks(False)
    t_row_sort = best_of(lambda: np.argsort(-row_best, axis=1), args.repeats)
    t_col_sort = best_of(lambda: np.argsort(-col_best, axis=1), args.repeats)
    one_core = t_row_masks + t_col_masks + t_row_sort + t_col_sort
    floor = one_core / args.threads
    budget = (args.ratio - 1.0) * t_products
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shape": {"images": n_q, "captions": n_k, "dim": args.dim, "k": args.k,
                  "k_images": args.k_images, "tile": [br, tc], "tiles": len(tiles)},
        "threads": args.threads,
        # Hits in the timed tiles: with one tile, exactly K per row and per column.
        "hits_in_timed_tiles": {**hits, "tiles": len(tile_scores)},
        "seconds": {"bare_products": t_products, "row_masks": t_row_masks,
                    "column_masks": t_col_masks, "sort_i2t_table": t_row_sort,
                    "sort_t2i_table": t_col_sort, "selection_one_core": one_core,
                    "selection_floor_all_cores": floor,
                    f"budget_at_{args.ratio:g}x": budget},
        "floor_ratio": (t_products + floor) / t_products,
    }
    print(f"bare products ({len(tiles)} tiles of {br}x{tc}, {args.threads} threads): "
          f"{t_products:.2f} s")
    print(f"selection floor, one core: masks {t_row_masks:.2f} + {t_col_masks:.2f} s, "
          f"ranked tables {t_row_sort:.2f} + {t_col_sort:.2f} s = {one_core:.2f} s")
    print(f"on {args.threads} cores at once: {floor:.2f} s against a budget of "
          f"{budget:.2f} s at {args.ratio:g}x -> at best {result['floor_ratio']:.2f}x "
          f"the bare products")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
