"""The least selection any exact two-table pass must do on CPU, timed primitive by
primitive (results: docs/benchmarks.md §1, "How close 1.3× can get").

Mining both tables in one pass has to (1) compute every product, (2) find, in each
tile, the scores at or above a row's and a column's threshold, and (3) hand back each
row's and each column's K best in rank order. This script times (1) with the engine's
tile shape, and the cheapest form of (2) and (3) with the fastest CPU primitives
(``aoq.search.kernels`` lists them): one ``scores >= threshold`` mask and one
``flatnonzero`` per tile and direction, given the *final* thresholds for free (a real
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from aoq.search.options import SearchOptions


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=10000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=2000, help="K of i2t (captions per image)")
    p.add_argument("--k-images", type=int, default=400, help="K of t2i (images per caption)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads for the products; the selection floor is divided "
                        "by this too, as if it ran on every core at once")
    p.add_argument("--ratio", type=float, default=1.3, help="the goal: both tables in "
                   "at most RATIO x the bare products")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    n_q, n_k = args.n_images, args.n_images * args.captions_per_image
    q, kk = embeddings(n_q, args.dim, args.seed), embeddings(n_k, args.dim, args.seed + 1)
    options = SearchOptions()
    br, tc = options.default_block_rows, options.default_tile_cols
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

    out = torch.empty(br, tc)

    def products() -> None:
        for r0, c0 in tiles:
            a, b = q[r0:r0 + br], kk[c0:c0 + tc]
            torch.mm(a, b.T, out=out[:a.shape[0], :b.shape[0]])

    tile_scores = {t: (q[t[0]:t[0] + br] @ kk[t[1]:t[1] + tc].T).numpy() for t in tiles[:4]}

    hits = {"rows": 0, "columns": 0}

    def masks(rows: bool) -> float:
        """Mask and positions, per tile, over every tile (timed on up to 4 real tiles
        and scaled by the tile count, to keep the whole matrix out of memory)."""
        total = 0.0
        for (r0, c0), s in tile_scores.items():
            th = row_th[r0:r0 + s.shape[0]] if rows else col_th[:, c0:c0 + s.shape[1]]
            mask = np.empty(s.shape, dtype=bool)
            total += best_of(lambda: np.flatnonzero(np.greater_equal(s, th, out=mask)),
                             args.repeats)
            hits["rows" if rows else "columns"] += int(mask.sum())
        return total / len(tile_scores) * len(tiles)

    t_products = best_of(products, args.repeats)
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
