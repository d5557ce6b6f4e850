"""The tiling engine: row and column top-k of ``queries @ keys.T`` without the matrix.

How it is fast and still exact
------------------------------
Products are computed tile by tile: ``block_rows`` queries x ``tile_cols`` keys
(1024 x ~4k fp32 = 16 MiB, a size at which MKL sgemm runs at full speed). A tile is never
sorted or topk'd. Every row (and, when column top-k is asked for, every column) has a
*threshold*; one ``>=`` pass and one ``nonzero`` over the tile keep the entries at or
above it as candidates (about 1 ns per score on one core: :mod:`aoq.search.kernels`). A
threshold estimates the row's k-th largest score from a uniform sample of the row: keys
and queries are visited in a fixed pseudo-random order, so the first ``row_sample``
(2048) columns of a row block's first tile sample every row of the block, and the first
``col_sample`` (512) rows of a worker's first row block sample every column. The sample rank is set ``z`` (3) standard
deviations past its expected k-th rank, so a row keeps about ``k + 3 sqrt(k n / m)``
candidates (m sampled out of n) and almost always at least k. The estimate only decides
speed, never the result: a row with at least k candidates (every score >= its threshold)
provably holds its exact top k; the rare row with fewer is recomputed in full at the end
(~0.1% of rows). Column candidates accumulate over row blocks; when they outgrow
``(1 + column_slack) k`` per column they are cut to the running top k, and the column's
threshold is raised to the running k-th score (a lower bound of the final one, so this
is exact too). The knobs are fields of :class:`aoq.search.options.SearchOptions`.

Ties cost nothing: candidates are int64 keys whose sort is the brute-force order
(:mod:`aoq.search.keys`). Keys are sorted in groups of ``sort_rows`` (128) rows (~350k
keys), which stay in cache and sort ~2x faster per key than millions.

An excluded band (query q and key j excluded when ``q // qg == j // kg``) is the same set
of entries of the query x key matrix for both directions: it is set to -inf in each tile
before any selection.

On CPU the work is split into whole row blocks, taken by one worker per torch thread of
the caller; each worker runs torch single-threaded (products included) on a helper
thread (:mod:`aoq.search.parallel` says why). Each worker keeps its own column
candidates and thresholds; they are merged at the end, a column being exact when its
k-th score is at least every worker's first estimate. On CUDA one worker runs on the
calling thread, in stream order.

Memory, beyond inputs and outputs: a permuted copy of the inputs; per worker one tile
(``block_rows * 4096 * 4`` B), two masks, a scratch for the threshold samples
(``block_rows * 2048 * 4`` B) and the row candidates of its block
(~ ``1.35 * block_rows * k_row`` int64 at the defaults); and the column candidates of
all workers, at most ``(1 + column_slack) * n_keys * k_col`` int64 plus a tile's worth
per worker. Nothing is ever n_queries x n_keys. On 10k x 50k (k_row = 2000,
k_col = 400, defaults, 2 threads) the peak was 0.8 GB above inputs and outputs (measured).

Measured against faiss and against the bare products of the same tiles, with the
commands and the machine: ``docs/benchmarks.md``, section 1.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from aoq.search.kernels import HitMask, gather, kth_largest, put_rows, sort_unique
from aoq.search.keys import bits_for, first_k, kth_score, make_keys, value_of
from aoq.search.options import SearchOptions
from aoq.search.parallel import run_tasks

__all__ = ["Result", "blocked_topk", "block_rows_for", "tile_plan", "workers_for"]

#: ``((row_values, row_ids), (col_values, col_ids))``: (n_q, k_row) and (n_k, k_col).
Result = tuple[tuple[torch.Tensor | None, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]

_COUNTERS = ("row_candidates", "col_candidates", "row_recomputed", "col_recomputed",
             "compactions")
_WORKER_COUNTERS = ("row_candidates", "col_candidates", "compactions")


def blocked_topk(
    q: torch.Tensor,
    kk: torch.Tensor,
    k_row: int,
    k_col: int,
    groups: tuple[int, int] | None,
    *,
    block_rows: int | None,
    tile_cols: int | None,
    progress: bool | str,
    stats: dict[str, Any],
    score_dtype: torch.dtype,
    want_values: bool,
    options: SearchOptions,
    col_dtype: torch.dtype = torch.int64,
) -> Result:
    """Row top-k_row and column top-k_col of ``q @ kk.T``, the band ``groups`` excluded.

    Inputs are checked already: q (n_q, d) and kk (n_k, d) float32 on the compute device,
    k's in range. Products are in ``score_dtype``.

    Returns:
        ``((row_values, row_ids), (col_values, col_ids))`` on CPU with shapes (n_q, k_row)
        and (n_k, k_col): float32 scores (None unless ``want_values``), int64 row ids and
        ``col_dtype`` column ids (original indices), by descending score then ascending
        index. ``stats`` gets the counters, the plan and the seconds spent.
    """
    n_q, n_k = q.shape[0], kk.shape[0]
    counters = dict.fromkeys(_COUNTERS, 0)
    stats.update(counters)
    if (k_row == 0 and k_col == 0) or n_q == 0 or n_k == 0:
        return _empty_result(n_q, n_k, k_row, k_col, want_values, col_dtype)
    if bits_for(n_k) > 31 or bits_for(n_q) > 31:
        raise ValueError("more than 2**31 queries or keys are not supported")
    n_workers = workers_for(q.device, options)
    br, nt = tile_plan(n_q, n_k, bool(k_col), block_rows_for(n_q, n_workers, block_rows,
                                                             options), tile_cols, options)
    n_blocks = -(-n_q // br)
    n_workers = min(n_workers, n_blocks)
    shared = _Shared(q, kk, k_row, k_col, groups, br, nt, score_dtype=score_dtype,
                     want_values=want_values, col_dtype=col_dtype, options=options)
    workers = [_BlockWorker(shared, score_dtype) for _ in range(n_workers)]
    stats.update(block_rows=br, tile_cols=nt, workers=n_workers)

    t0 = time.perf_counter()
    _run_blocks(workers, n_blocks, progress)
    shared.qp = shared.kp = None  # the permuted copies are no longer needed
    t1 = time.perf_counter()
    short_cols = _merge_columns(shared, workers) if k_col else []
    short_rows = [ids for w in workers for ids in w.short_rows]
    t2 = time.perf_counter()
    _recompute_short(shared, q, kk, short_rows, short_cols, score_dtype, counters)
    t3 = time.perf_counter()
    _record(stats, counters, workers, {"blocks": t1 - t0, "merge_columns": t2 - t1,
                                       "recompute": t3 - t2})
    return (shared.row_v, shared.row_i), (shared.col_v, shared.col_i)


# ------------------------------------------------------------------------ planning


def workers_for(device: torch.device, options: SearchOptions) -> int:
    """Workers to run: one per torch thread of the caller on CPU (see
    :mod:`aoq.search.parallel`), at most ``max_workers``; one on CUDA."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return max(1, min(threads, options.max_workers)) if options.use_workers else 1


def block_rows_for(n_q: int, n_workers: int, block_rows: int | None,
                   options: SearchOptions) -> int | None:
    """The caller's ``block_rows``, or with several workers and none given, enough
    blocks to keep every worker busy to the end (of 256 rows or more, for sgemm's sake).

    The blocks are then evened out to a multiple of the workers in number, so that no
    worker idles at the end while another finishes a full block: 10k rows on 2 workers
    are 10 blocks of 1,000 rows, not 9 of 1,024 and one of 784 (sgemm runs as fast
    per row at any multiple of 8 rows, measured).
    """
    if block_rows is None and n_workers > 1:
        rows = min(options.default_block_rows,
                   max(256, -(-n_q // (4 * n_workers)) + 63) // 64 * 64)
        n_blocks = -(-n_q // rows)
        n_blocks = -(-n_blocks // n_workers) * n_workers
        per_block = -(-n_q // n_blocks)
        return max(8, -(-per_block // 8) * 8)
    return block_rows


def tile_plan(n_q: int, n_k: int, columns: bool, block_rows: int | None,
              tile_cols: int | None, options: SearchOptions) -> tuple[int, int]:
    """(rows per block, columns per tile) for ``n_q x n_k`` products; ``columns``: column
    top-k is wanted too (its keys bound the tile width)."""
    kb, qb = bits_for(n_k), bits_for(n_q)
    # Row keys hold (row in block | rank | key id): rows per block <= 2**(31 - kb).
    br = min(block_rows or options.default_block_rows, n_q, 1 << (31 - kb))
    nt = min(tile_cols or options.default_tile_cols, n_k)
    if tile_cols is None and nt < n_k and 2 * br <= options.default_block_rows:
        # Small blocks (block_rows=1 ...): wider tiles cost nothing and save Python loops.
        # (Not for blocks evened out to a little under the default: a tile just past
        # 4096 columns doubles the padded row stride, and so the masks.)
        nt = min(n_k, max(nt, (1 << 22) // br))
    if columns:
        # Column keys hold (column in tile | rank | query id): <= 2**(31 - qb) columns.
        nt = min(nt, 1 << (31 - qb))
    # Near-equal widths that are multiples of 64: sgemm runs ~1.5x slower on odd widths
    # (3847 vs 3840 columns, measured), and a narrow last tile wastes a pass.
    if nt < n_k:
        nt = min(nt, -(-(-(-n_k // -(-n_k // nt))) // 64) * 64)
    return br, nt


def _sample_rank(k: int, m: int, n: int, z: float) -> int:
    """Rank r such that the r-th largest of a uniform m-sample of n scores is, with
    probability ~ 1 - Phi(-z), below the k-th largest of all n."""
    if m >= n:
        return k
    f = m / n
    mean = k * f
    r = math.ceil(mean + z * math.sqrt(mean * (1.0 - f))) + 1
    return max(1, min(r, m))


def _kth_largest(scores: torch.Tensor, r: int, dim: int, scratch: torch.Tensor) -> torch.Tensor:
    """r-th largest along ``dim`` as a float32 threshold; never -inf (so excluded
    entries, which are -inf, never pass ``>=``)."""
    r = min(r, scores.shape[dim])
    return kth_largest(scores, r, dim, scratch).clamp_(min=torch.finfo(torch.float32).min)


def _positive_positions(q_order: torch.Tensor, k_inverse: torch.Tensor, n_k: int,
                        qg: int, kg: int) -> torch.Tensor:
    """(n_q, kg) positions, in the visiting order of keys, of each visited query's
    excluded keys; -1 where the group runs past the last key."""
    dev = q_order.device
    first = (q_order // qg) * kg
    orig = first[:, None] + torch.arange(kg, device=dev)
    valid = orig < n_k
    return torch.where(valid, k_inverse[orig.clamp(max=n_k - 1)], -1)


# ---------------------------------------------------------------------- shared state


class _Shared:
    """State shared by the workers: problem, visiting order, permuted inputs, outputs."""

    def __init__(self, q: torch.Tensor, kk: torch.Tensor, k_row: int, k_col: int,
                 groups: tuple[int, int] | None, br: int, nt: int, *,
                 score_dtype: torch.dtype, want_values: bool, col_dtype: torch.dtype,
                 options: SearchOptions) -> None:
        n_q, n_k = q.shape[0], kk.shape[0]
        self.options = options
        self.n_q, self.n_k = n_q, n_k
        self.k_row, self.k_col, self.br, self.nt = k_row, k_col, br, nt
        self.groups = groups
        self.want_values = want_values
        self.tiles = [(c0, min(c0 + nt, n_k)) for c0 in range(0, n_k, nt)]
        # Column candidates are kept per slice of col_slice columns of a tile, so that
        # the final sorts are of a few 100k keys each (see SearchOptions.sort_rows).
        cs = options.col_slice
        self.col_slices = [[(a, min(a + cs, c1 - c0)) for a in range(0, c1 - c0, cs)]
                           for c0, c1 in self.tiles]
        self.kb, self.qb = bits_for(n_k), bits_for(n_q)
        # Power-of-two row stride: a flat position in a tile splits into (row, column)
        # with a shift and a mask instead of a division; sgemm writes that padded
        # layout in place at full speed.
        self.ld = 1 << (nt - 1).bit_length()
        self.ld_bits = self.ld.bit_length() - 1
        self._visit(q, kk, score_dtype)
        self.pos = None
        if groups is not None:
            k_inverse = torch.empty_like(self.k_order)
            k_inverse[self.k_order] = torch.arange(n_k, device=self.k_order.device)
            self.pos = _positive_positions(self.q_order, k_inverse, n_k, *groups)
        self.m_row = min(nt, options.row_sample)
        self.r_row = _sample_rank(k_row, self.m_row, n_k, options.z) if k_row else 0
        self.m_col = min(br, options.col_sample)
        self.r_col = _sample_rank(k_col, self.m_col, n_q, options.z) if k_col else 0
        # Zeroed, not empty: the workers write whole rows in random order, and first
        # touches in that order cost 1.5 us a page against 0.7 us for torch's parallel
        # sequential fill (160 MB: 69 ms against 29 + 8 ms, measured on the 2-core VM).
        self.row_v = torch.zeros(n_q, k_row, dtype=torch.float32) if want_values else None
        self.row_i = torch.zeros(n_q, k_row, dtype=torch.int64)
        self.col_v = torch.zeros(n_k, k_col, dtype=torch.float32) if want_values else None
        self.col_i = torch.zeros(n_k, k_col, dtype=col_dtype)

    def _visit(self, q: torch.Tensor, kk: torch.Tensor, score_dtype: torch.dtype) -> None:
        """Visiting order and the inputs permuted to it, in ``score_dtype``.

        Pseudo-random, so a tile / a row block is a uniform sample for the thresholds.
        Results never depend on it (keys hold original ids); an order that would not be
        sampled from (one tile, one block) stays the identity and costs no copy.
        """
        dev, n_q, n_k = q.device, self.n_q, self.n_k
        gen = torch.Generator().manual_seed(self.options.order_seed)
        self.keys_permuted = bool(self.k_row) and self.nt < n_k
        self.queries_permuted = bool(self.k_col) and self.br < n_q
        self.k_order = (torch.randperm(n_k, generator=gen) if self.keys_permuted
                        else torch.arange(n_k)).to(dev)
        self.q_order = (torch.randperm(n_q, generator=gen) if self.queries_permuted
                        else torch.arange(n_q)).to(dev)
        self.qp: torch.Tensor | None = (q[self.q_order] if self.queries_permuted
                                        else q).to(score_dtype)
        self.kp: torch.Tensor | None = (torch.index_select(kk, 0, self.k_order)
                                        if self.keys_permuted else kk).to(score_dtype)


class _ColumnStore:
    """Column-direction candidates of one slice of a tile, as int64 keys
    ``(column in slice | score rank | original query id)``, kept or pending."""

    __slots__ = ("device", "parts", "size")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, keys: torch.Tensor) -> None:
        self.parts.append(keys)
        self.size += keys.numel()

    def sorted_keys(self) -> torch.Tensor:
        """All keys, sorted (the store is emptied)."""
        if not self.parts:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        keys = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        self.parts, self.size = [], 0
        # Keys are unique (they hold the query id), so any sort is the stable sort.
        return sort_unique(keys)


class _RowBlock:
    """Row-direction state of one row block: threshold and candidates per sort group."""

    __slots__ = ("cuts", "groups", "parts", "threshold")

    def __init__(self, rows_here: int, ld: int, sort_rows: int, device: torch.device) -> None:
        self.groups = [(g0, min(g0 + sort_rows, rows_here))
                       for g0 in range(0, rows_here, sort_rows)]
        # Flat tile positions at which each sort group but the first starts.
        self.cuts = torch.tensor([g0 * ld for g0, _ in self.groups[1:]], dtype=torch.int64,
                                 device=device)
        self.parts: list[list[torch.Tensor]] = [[] for _ in self.groups]
        self.threshold: torch.Tensor | None = None  # (rows_here, 1), from the first tile


# ------------------------------------------------------------------------- workers


class _BlockWorker:
    """Products and selection for whole row blocks, one block at a time.

    Workers share nothing they write except disjoint output rows: each keeps its own
    tile buffer, masks, row candidates and column candidates (with its own column
    thresholds, estimated from the first block it gets), merged at the end.
    """

    def __init__(self, shared: _Shared, score_dtype: torch.dtype) -> None:
        sh = shared
        dev = sh.k_order.device
        self.sh = sh
        self.buf = torch.empty(sh.br * sh.ld, dtype=score_dtype, device=dev)
        # Scratch for the threshold estimates: a row block's sample, or (transposed) the
        # first rows of a tile.
        self.sample_buf = torch.empty(max(sh.br * sh.m_row if sh.k_row else 0,
                                          sh.m_col * sh.nt if sh.k_col else 0),
                                      dtype=score_dtype, device=dev)
        self.row_mask = HitMask(sh.br if sh.k_row else 0, sh.ld, dev)
        self.col_mask = HitMask(sh.br if sh.k_col else 0, sh.options.col_slice, dev)
        self.col_stores = [[_ColumnStore(dev) for _ in sh.col_slices[c]]
                           for c in range(len(sh.tiles))] if sh.k_col else []
        # Threshold in force (raised by compactions) and the first estimate, which the
        # merge must check against the final k-th score.
        self.col_threshold: torch.Tensor | None = None
        self.col_estimate: torch.Tensor | None = None
        self.short_rows: list[torch.Tensor] = []
        self.counters = dict.fromkeys(_WORKER_COUNTERS, 0)
        self.timing = {"products": 0.0, "selection": 0.0}

    def block(self, r0: int) -> None:
        """Rows ``r0 .. r0 + block_rows - 1`` (visiting order) against every key tile."""
        sh = self.sh
        rows_here = min(sh.br, sh.n_q - r0)
        dev = self.buf.device
        q_blk = sh.qp[r0:r0 + rows_here]
        q_ids = sh.q_order[r0:r0 + rows_here]
        rows = _RowBlock(rows_here, sh.ld, sh.options.sort_rows, dev) if sh.k_row else None
        first_block = self.col_threshold is None
        if sh.k_col and first_block:
            self.col_threshold = torch.empty(sh.n_k, dtype=torch.float32, device=dev)
            self.col_estimate = torch.empty(sh.n_k, dtype=torch.float32, device=dev)
        for c, (c0, c1) in enumerate(sh.tiles):
            t0 = time.perf_counter()
            s = self.buf[: rows_here * sh.ld].view(rows_here, sh.ld)[:, : c1 - c0]
            torch.mm(q_blk, sh.kp[c0:c1].T, out=s)
            t1 = time.perf_counter()
            if sh.pos is not None:
                self._exclude(s, r0, c0, c1)
            if rows is not None:
                self._select_rows(s, rows, c0, c1)
            if sh.k_col:
                self._select_columns(s, c, q_ids, first_block)
            self.timing["products"] += t1 - t0
            self.timing["selection"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        if rows is not None:
            self._finish_rows(rows, r0, q_ids)
        self.timing["selection"] += time.perf_counter() - t0

    def _exclude(self, s: torch.Tensor, r0: int, c0: int, c1: int) -> None:
        """Set the band's entries of tile ``s`` (rows_here, c1 - c0) to -inf."""
        pos_blk = self.sh.pos[r0:r0 + s.shape[0]]
        hit_r, hit_t = ((pos_blk >= c0) & (pos_blk < c1)).nonzero(as_tuple=True)
        s[hit_r, pos_blk[hit_r, hit_t] - c0] = -torch.inf

    def _select_rows(self, s: torch.Tensor, rows: _RowBlock, c0: int, c1: int) -> None:
        """Row candidates of tile ``s``: every entry at or above its row's threshold."""
        sh = self.sh
        rows_here = s.shape[0]
        ld = sh.ld
        if rows.threshold is None:
            rows.threshold = _kth_largest(s[:, : sh.m_row], sh.r_row, 1, self.sample_buf
                                          )[:, None]
        flat = self.row_mask.hits(s, rows.threshold, ld)
        keys = make_keys(gather(self.buf, flat).float(), flat >> sh.ld_bits,
                         gather(sh.k_order[c0:c1], flat & (ld - 1)), sh.kb)
        # Row-major hits: each sort group of rows is one slice.
        for i, part in enumerate(torch.tensor_split(
                keys, torch.searchsorted(flat, rows.cuts).tolist())):
            rows.parts[i].append(part)

    def _select_columns(self, s: torch.Tensor, c: int, q_ids: torch.Tensor,
                        first_block: bool) -> None:
        """Column candidates of tile ``c`` (scores ``s``), slice by slice."""
        sh = self.sh
        c0, c1 = sh.tiles[c]
        if first_block:
            estimate = _kth_largest(s[: sh.m_col], sh.r_col, 0, self.sample_buf)
            self.col_threshold[c0:c1] = estimate
            self.col_estimate[c0:c1] = estimate
        for j, (a, z) in enumerate(sh.col_slices[c]):
            self._select_slice(s, a, z, self.col_threshold[c0 + a:c0 + z],
                               self.col_stores[c][j], q_ids)

    def _select_slice(self, s: torch.Tensor, a: int, z: int, threshold: torch.Tensor,
                      store: _ColumnStore, q_ids: torch.Tensor) -> None:
        """Columns ``a .. z - 1`` of ``s`` into ``store``; a compaction raises
        ``threshold`` (a view of the worker's column thresholds) in place."""
        sh, opt = self.sh, self.sh.options
        cs = opt.col_slice
        flat = self.col_mask.hits(s[:, a:z], threshold, cs)
        row = flat >> opt.col_slice_bits
        col = flat & (cs - 1)
        store.add(make_keys(gather(self.buf, (row << sh.ld_bits) + (col + a)).float(),
                            col, gather(q_ids, row), sh.qb))
        self.counters["col_candidates"] += flat.numel()
        if store.size > max(opt.column_cap_min, (1.0 + opt.column_slack) * (z - a) * sh.k_col):
            _compact(store, threshold, sh.k_col, sh.qb)
            self.counters["compactions"] += 1

    def _finish_rows(self, rows: _RowBlock, r0: int, q_ids: torch.Tensor) -> None:
        """Sort each group's row candidates, store the top k, note the short rows."""
        sh = self.sh
        for i, (g0, g1) in enumerate(rows.groups):
            parts = rows.parts[i]
            keys = sort_unique(parts[0] if len(parts) == 1 else torch.cat(parts))
            rows.parts[i] = []
            self.counters["row_candidates"] += keys.numel()
            v, ids, ok = first_k(keys, g1 - g0, sh.k_row, sh.kb, group_offset=g0,
                                 want_values=sh.want_values)
            _store(sh.row_v, sh.row_i, v, ids, q_ids[g0:g1], r0 + g0, sh.queries_permuted)
            if not bool(ok.all()):
                self.short_rows.append(q_ids[g0:g1][~ok])


def _run_blocks(workers: list[_BlockWorker], n_blocks: int, progress: bool | str) -> None:
    """Every row block once, by whichever worker is free; ``progress``: a tqdm bar
    (labelled by the string, or "search")."""
    bar = None
    if progress:
        from tqdm.auto import tqdm  # optional and slow to import: only when asked for

        label = progress if isinstance(progress, str) else "search"
        bar = tqdm(total=n_blocks, desc=label, unit="block")
    br = workers[0].sh.br
    try:
        run_tasks(workers, [b * br for b in range(n_blocks)], _BlockWorker.block, bar)
    finally:
        if bar is not None:
            bar.close()


# -------------------------------------------------------------------- finishing


def _merge_columns(shared: _Shared, workers: list[_BlockWorker]) -> list[torch.Tensor]:
    """Merge the workers' column candidates slice by slice; returns the columns to
    recompute.

    A column is exact when it has k candidates and its k-th score is at least every
    worker's first threshold estimate (later thresholds were running k-th scores, never
    above the final one).
    """
    sh = shared
    estimate = torch.stack([w.col_estimate for w in workers if w.col_estimate is not None]
                           ).amax(dim=0)
    short: list[torch.Tensor] = []
    tasks = [(c, j) for c in range(len(sh.tiles)) for j in range(len(sh.col_slices[c]))]

    def merge(_: _BlockWorker, task: tuple[int, int]) -> None:
        c, j = task
        g0 = sh.tiles[c][0] + sh.col_slices[c][j][0]
        g1 = sh.tiles[c][0] + sh.col_slices[c][j][1]
        store = _ColumnStore(sh.k_order.device)
        for w in workers:
            for part in w.col_stores[c][j].parts:
                store.add(part)
            w.col_stores[c][j] = _ColumnStore(sh.k_order.device)  # free as we go
        keys = store.sorted_keys()
        v, i, ok = first_k(keys, g1 - g0, sh.k_col, sh.qb, want_values=sh.want_values)
        ok &= kth_score(keys, g1 - g0, sh.k_col, sh.qb) >= estimate[g0:g1]
        ids = sh.k_order[g0:g1]
        _store(sh.col_v, sh.col_i, v if sh.want_values else None, i, ids, g0,
               sh.keys_permuted)
        if not bool(ok.all()):
            short.append(ids[~ok])  # list.append is atomic

    run_tasks(workers, tasks, merge)
    return short


def _store(out_v: torch.Tensor | None, out_i: torch.Tensor, v: torch.Tensor | None,
           i: torch.Tensor, ids: torch.Tensor, start: int, permuted: bool) -> None:
    """Write result rows (G, k) for original ids ``ids`` (G,) (a plain slice from
    ``start`` when not permuted)."""
    i = i.cpu()  # the writes cast to the output's dtype
    if permuted:
        dest = ids.cpu()
        put_rows(out_i, dest, i)
        if out_v is not None:
            put_rows(out_v, dest, v.cpu())
    else:
        out_i[start:start + i.shape[0]] = i
        if out_v is not None:
            out_v[start:start + i.shape[0]] = v.cpu()


def _compact(store: _ColumnStore, threshold: torch.Tensor, k: int, index_bits: int) -> None:
    """Keep each column's running top k, and raise its threshold to the running k-th
    score: the final k-th score can only be higher, so nothing exact is dropped."""
    keys = store.sorted_keys()
    dev = keys.device
    column = keys >> (32 + index_bits)
    counts = torch.bincount(column, minlength=threshold.numel())
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keys.numel(), device=dev) - starts[column]
    kept = keys[rank < k]
    store.add(kept)
    full = (counts >= k).nonzero().squeeze(1)
    if full.numel():
        new_counts = counts.clamp(max=k)
        new_starts = torch.cumsum(new_counts, 0) - new_counts
        kth = kept[new_starts[full] + (k - 1)]
        kth_value = value_of((kth >> index_bits) & 0xFFFFFFFF)
        threshold[full] = torch.maximum(threshold[full], kth_value)


def _recompute_short(shared: _Shared, q: torch.Tensor, kk: torch.Tensor,
                     short_rows: list[torch.Tensor], short_cols: list[torch.Tensor],
                     score_dtype: torch.dtype, counters: dict[str, int]) -> None:
    """Recompute, in full, the rows and columns with fewer than k candidates."""
    sh = shared
    if short_cols:
        ids = torch.cat(short_cols)
        counters["col_recomputed"] = ids.numel()
        swapped = None if sh.groups is None else (sh.groups[1], sh.groups[0])
        _recompute(kk, q, ids, sh.k_col, swapped, sh.col_v, sh.col_i, score_dtype)
    if short_rows:
        ids = torch.cat(short_rows)
        counters["row_recomputed"] = ids.numel()
        _recompute(q, kk, ids, sh.k_row, sh.groups, sh.row_v, sh.row_i, score_dtype)


def _recompute(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, k: int,
               groups: tuple[int, int] | None, out_v: torch.Tensor | None,
               out_i: torch.Tensor, score_dtype: torch.dtype) -> None:
    """Full rows ``a[ids] @ b.T`` (band excluded), top k by the same stable key order."""
    dev = a.device
    n_b = b.shape[0]
    index_bits = bits_for(n_b)
    chunk = max(1, min(1 << (31 - index_bits), (1 << 24) // n_b))
    b_cast = b.to(score_dtype)
    for s in range(0, ids.numel(), chunk):
        sel = ids[s:s + chunk].to(dev)
        scores = torch.mm(a[sel].to(score_dtype), b_cast.T).float()
        if groups is not None:
            qg, kg = groups
            first = (sel // qg) * kg
            cols = first[:, None] + torch.arange(kg, device=dev)
            r, t = (cols < n_b).nonzero(as_tuple=True)
            scores[r, cols[r, t]] = -torch.inf
        hr, hc = torch.isfinite(scores).nonzero(as_tuple=True)
        keys = sort_unique(make_keys(scores[hr, hc], hr, hc, index_bits))
        v, i, _ = first_k(keys, sel.numel(), k, index_bits, want_values=out_v is not None)
        _store(out_v, out_i, v, i, sel, 0, True)


def _empty_result(n_q: int, n_k: int, k_row: int, k_col: int, want_values: bool,
                  col_dtype: torch.dtype) -> Result:
    """Output tables when there is nothing to compute (a zero k or no rows)."""
    return ((torch.empty(n_q, k_row) if want_values else None,
             torch.empty(n_q, k_row, dtype=torch.int64)),
            (torch.empty(n_k, k_col) if want_values else None,
             torch.empty(n_k, k_col, dtype=col_dtype)))


def _record(stats: dict[str, Any], counters: dict[str, int], workers: list[_BlockWorker],
            seconds: dict[str, float]) -> None:
    """Counters summed over workers, then seconds per phase (products and selection:
    the mean per worker)."""
    for w in workers:
        for key in _WORKER_COUNTERS:
            counters[key] += w.counters[key]
    stats.update(counters)
    n = len(workers)
    timing = {**seconds, "products": sum(w.timing["products"] for w in workers) / n,
              "selection": sum(w.timing["selection"] for w in workers) / n}
    stats.update({f"seconds_{key}": round(val, 3) for key, val in timing.items()})
