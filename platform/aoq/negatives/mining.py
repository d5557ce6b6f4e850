"""Exact blocked top-K search: the offline candidate tables of AOQ (design.md §1, §5, §7).

``mine_candidates`` builds both tables from one pass of matrix products:

* ``i2t`` (n_images, k_captions) int64: per image, its k_captions highest-scoring
  captions, the image's own captions (columns ``cpi*i .. cpi*i + cpi - 1``) excluded;
* ``t2i`` (n_captions, k_images) int32: per caption ``j``, its k_images highest-scoring
  images, its own image ``j // cpi`` excluded.

Scores are fp32 inner products. Every row is sorted by descending score, equal scores
by ascending index, so the tables are a pure function of the embeddings and equal a
brute-force stable sort of the full score matrix. ``exact_topk`` is the same engine for
one direction and any (query_group, key_group) exclusion band.

How it is fast and still exact
------------------------------
Products are computed tile by tile: ``block_rows`` images x ``tile_cols`` captions
(1024 x ~4k fp32 = 16 MiB, a size at which MKL sgemm runs at full speed). A tile is never
sorted or topk'd. Every row (and, for t2i, every column) has a *threshold*; one ``>=``
pass and one ``nonzero`` over the tile keep the entries at or above it as candidates
(~1.7 ns per score on one core). A threshold estimates the row's k-th largest score from a
uniform sample of the row: keys and queries are visited in a fixed pseudo-random order,
so the first 2048 columns of a row block's first tile sample every row of the block,
and the first 512 rows of a worker's first row block sample every column. The sample rank is
set ``_Z = 3`` standard deviations past its expected k-th rank, so a row keeps about
``k + 3 sqrt(k n / m)`` candidates (m sampled out of n) and almost always at least k.
The estimate only decides speed, never the result: a row with at least k candidates
(every score >= its threshold) provably holds its exact top k; the rare row with fewer
is recomputed in full at the end (~0.1% of rows). t2i candidates accumulate over row
blocks; when they outgrow ``(1 + _COLUMN_SLACK) k`` per column they are cut to the
running top k, and the column's threshold is raised to the running k-th score (a lower
bound of the final one, so this is exact too).

Ties cost nothing. A candidate is one int64 key ``(group | rank of its score | original
index)``, where the 32-bit rank is an order-reversing integer image of the float (exact,
with -0.0 == +0.0) and the index is the *original* one. One radix sort of the keys
(torch's for 1-D integers) orders each row by score descending, then index ascending:
exactly the brute-force order, whatever the visiting order. Keys are sorted in groups of
128 rows (~350k keys), which stay in cache and sort ~2x faster per key than millions.

The own-caption / own-image entries are the same entries of the image x caption
matrix for both tables: they are set to -inf in each tile before any selection.

On CPU the work is split into whole row blocks, taken by one worker per torch thread
of the caller; each worker runs torch single-threaded (products included) on a helper
thread. A worker alternates long sgemm calls with dozens of short, memory-bound
selection ops, so while one multiplies another selects and all cores stay busy, with no
OpenMP team in the loop. (Run with torch's intra-op threads instead, each short op is a
parallel region ending in a barrier, and on the shared 2-core box such a barrier cost
milliseconds whenever another process wanted a core: a 345k-key sort went from 6 ms to
190 ms and mining from 1.3x to 4-7x the products, measured.) Each worker keeps its own
t2i candidates and column thresholds; they are merged at the end, a column being exact
when its k-th score is at least every worker's first estimate. On CUDA one worker runs
on the calling thread, in stream order.

Memory, beyond inputs and outputs: a permuted copy of the inputs; per worker one tile
(``block_rows * 4096 * 4`` B), two masks, the row sample (``block_rows * 2048 * 4`` B) and
the row candidates of its block (~ ``1.35 * block_rows * k_captions`` int64 at the
defaults, twice while sorting); and the t2i candidates of all workers, at most
``(1 + _COLUMN_SLACK) * n_captions * k_images`` int64 plus a tile's worth per worker.
Nothing is ever n_images x n_captions. On 10k x 50k (K = 2000 / 400, defaults, 2
threads) the peak was 0.8 GB above inputs and outputs (measured).

Measured (``benchmarks/mining.py``, 10k images x 50k captions x 1024-d, K = 2000 / 400,
2 threads, best of 3 rounds on the quiet 2-core box): bare tile products 5.5 s, faiss
IndexFlatIP i2t 8.2 s, naive products + topk 8.9 s; i2t alone 7.1 s (1.29x the products,
1.15x faster than faiss), t2i alone 7.3 s, both tables in one pass 8.9 s; the authors'
per-row loop ~830 s.

``precision="bf16"`` computes bf16 products (2.3x the fp32 sgemm rate on the 2-core
box), keeps a shortlist of ``1.5 k`` per row by bf16 score, rescores the shortlist in fp32
with a sampled matrix product and returns the top k of that. It is not guaranteed exact
(measure it with :func:`overlap_at_k`); on CPU the rescoring costs more than the bf16
products save, so it only pays on GPUs.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["exact_topk", "mine_candidates", "overlap_at_k"]

#: Seed of the visiting order (it never changes results, only how the work is split).
_ORDER_SEED = 0x51A7
#: Standard deviations of headroom in a sampled threshold. 3 leaves ~0.1% of rows short
#: of k candidates (recomputed exactly); more headroom keeps more candidates per row.
_Z = 3.0
#: Column candidates may grow to (1 + this) * k per column before a compaction.
_COLUMN_SLACK = 1.0
#: ... but never compact fewer than this many keys (a compaction is a sort).
_COLUMN_CAP_MIN = 1 << 16
#: Default tile: 1024 x 4096 fp32 (16 MiB) runs MKL sgemm at ~95% of its large-matrix
#: speed on the 2-core box, and the selection passes over it mostly hit cache.
_DEFAULT_BLOCK_ROWS = 1024
_DEFAULT_TILE_COLS = 4096
#: Columns of the first tile whose scores set a row's threshold (a uniform sample, as
#: keys are visited in random order): more is a tighter threshold, fewer is a cheaper
#: topk; 2048 of 50k captions keeps ~1.34 k candidates per row at K = 2000.
_ROW_SAMPLE = 2048
#: Rows of the first row block whose scores set a column's threshold (same idea).
_COL_SAMPLE = 512
#: Candidates are kept and sorted in groups of this many rows (row direction) / columns
#: (column direction): a few 100k int64 keys radix-sort ~2x faster per key than millions
#: (they stay in cache), and the grouping is free (it follows row / column slices).
_SORT_ROWS = 128
_COL_SLICE = 512  # a power of two
_COL_SLICE_BITS = _COL_SLICE.bit_length() - 1
#: On CPU, run one single-threaded worker per torch thread of the caller (at most this
#: many), each taking whole row blocks (see _parallel); False: one worker on the
#: calling thread with the caller's torch threads (always so on CUDA).
_WORKERS = True
_MAX_WORKERS = 16
#: bf16 mode keeps this many times k candidates by bf16 score before fp32 rescoring.
_BF16_SHORTLIST = 1.5

_PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------- public API


def mine_candidates(
    image_emb: Any,
    caption_emb: Any,
    k_captions: int,
    k_images: int,
    captions_per_image: int = 5,
    *,
    block_rows: int | None = None,
    tile_cols: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    precision: str = "fp32",
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact offline candidate tables (design.md §1, §7) from one pass of products.

    Args:
        image_emb: (n_images, d) image embeddings, numpy or torch; float32 (float16,
            bfloat16 and float64 are converted to float32). Similarity is the inner
            product, so L2-normalise upstream for cosine.
        caption_emb: (n_captions, d) caption embeddings, n_captions =
            captions_per_image * n_images; the captions of image i are rows
            ``cpi*i .. cpi*i + cpi - 1``.
        k_captions: width of ``i2t``, 0 <= k_captions <= n_captions - captions_per_image.
        k_images: width of ``t2i``, 0 <= k_images <= n_images - 1.
        captions_per_image: cpi (5 for COCO and Flickr30K).
        block_rows: images per block (default 1024); memory grows linearly with it.
        tile_cols: captions per tile (default 4096, rounded to a multiple of 64); a
            tile of block_rows x tile_cols fp32 scores should fit in the last-level cache.
        device: where to compute; default CUDA when available, else CPU.
        progress: show a tqdm bar over row blocks.
        precision: "fp32" (exact) or "bf16": bf16 products pick a shortlist of
            ``1.5 * k`` per row, which is rescored exactly in fp32. Not guaranteed
            exact (compare with :func:`overlap_at_k`); it only pays where bf16 products
            are much faster than fp32 and gathers are cheap (GPUs).
        stats: if given, filled with counters (candidates, recomputed rows, ...).

    Returns:
        ``(i2t, t2i)``: i2t (n_images, k_captions) int64 caption ids and t2i
        (n_captions, k_images) int32 image ids, each row by descending score, equal
        scores by ascending id; a row never holds its own captions / own image.

    Raises:
        ValueError: on inconsistent shapes, counts, K out of range, non-float or
            non-finite embeddings, or an unknown precision.
    """
    cpi = _check_int("captions_per_image", captions_per_image, minimum=1)
    images = _as_matrix("image_emb", image_emb)
    captions = _as_matrix("caption_emb", caption_emb)
    n_images, n_captions = images.shape[0], captions.shape[0]
    if n_images == 0:
        raise ValueError("image_emb has no rows")
    if images.shape[1] != captions.shape[1]:
        raise ValueError(f"image_emb has dimension {images.shape[1]} but caption_emb has "
                         f"{captions.shape[1]}")
    if n_captions != cpi * n_images:
        raise ValueError(f"caption_emb has {n_captions} rows, expected captions_per_image "
                         f"* n_images = {cpi} * {n_images} = {cpi * n_images}")
    k_captions = _check_int("k_captions", k_captions, minimum=0,
                            maximum=n_captions - cpi, why="n_captions - captions_per_image")
    k_images = _check_int("k_images", k_images, minimum=0, maximum=n_images - 1,
                          why="n_images - 1")
    _check_finite("image_emb", images)
    _check_finite("caption_emb", captions)
    rows, cols = _search(
        images, captions, k_captions, k_images, groups=(1, cpi), block_rows=block_rows,
        tile_cols=tile_cols, device=device, progress=progress, precision=precision,
        stats=stats, want_values=False, col_dtype=torch.int32,
    )
    return rows[1].numpy(), cols[1].numpy()


def exact_topk(
    queries: Any,
    keys: Any,
    k: int,
    *,
    positives: tuple[int, int] | None = None,
    block_rows: int | None = None,
    tile_cols: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    precision: str = "fp32",
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k keys per query by inner product, with an optional excluded band.

    ``exact_topk(images, captions, K, positives=(1, 5))`` is the i2t table and
    ``exact_topk(captions, images, K, positives=(5, 1))`` the t2i one;
    :func:`mine_candidates` computes both from a single pass of products.

    Args:
        queries: (n_queries, d) float array or tensor.
        keys: (n_keys, d) float array or tensor.
        k: results per query, 0 <= k <= n_keys - (most keys excluded for one query).
        positives: ``(query_group, key_group)``: query q and key j are excluded from
            each other when ``q // query_group == j // key_group``. None excludes nothing.
        block_rows, tile_cols, device, progress, precision, stats: as in
            :func:`mine_candidates`.

    Returns:
        ``(scores, indices)``: (n_queries, k) float32 and int64, each row by descending
        score, equal scores by ascending key index. In bf16 mode the scores are the
        fp32 rescores of the shortlist.
    """
    q = _as_matrix("queries", queries)
    kk = _as_matrix("keys", keys)
    if q.shape[1] != kk.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but keys have {kk.shape[1]}")
    groups = None
    max_excluded = 0
    if positives is not None:
        if len(positives) != 2:
            raise ValueError(f"positives must be (query_group, key_group), got {positives!r}")
        qg = _check_int("positives[0]", positives[0], minimum=1)
        kg = _check_int("positives[1]", positives[1], minimum=1)
        groups = (qg, kg)
        max_excluded = _max_excluded(q.shape[0], kk.shape[0], qg, kg)
    k = _check_int("k", k, minimum=0, maximum=kk.shape[0] - max_excluded,
                   why="the number of keys not excluded for some query")
    _check_finite("queries", q)
    _check_finite("keys", kk)
    rows, _ = _search(q, kk, k, 0, groups=groups, block_rows=block_rows, tile_cols=tile_cols,
                      device=device, progress=progress, precision=precision, stats=stats)
    return rows[0].numpy(), rows[1].numpy()


def overlap_at_k(a: Any, b: Any) -> float:
    """Mean over rows of |set(a[i]) & set(b[i])| / k for two (n, k) index tables.

    1.0 means every row holds the same ids (in any order). Used to report how close the
    bf16 mode (or any approximate table) is to the exact one.
    """
    ta = torch.from_numpy(np.ascontiguousarray(_to_numpy(a), dtype=np.int64))
    tb = torch.from_numpy(np.ascontiguousarray(_to_numpy(b), dtype=np.int64))
    if ta.ndim != 2 or ta.shape != tb.shape:
        raise ValueError(f"overlap_at_k needs two (n, k) tables of one shape, got "
                         f"{tuple(ta.shape)} and {tuple(tb.shape)}")
    n, k = ta.shape
    if n == 0 or k == 0:
        return 1.0
    hits = 0
    # Sorted rows + searchsorted keeps this O(n k log k) without a k x k comparison.
    chunk = max(1, (1 << 22) // k)
    for s in range(0, n, chunk):
        x = torch.sort(ta[s:s + chunk], dim=1).values
        y = tb[s:s + chunk]
        pos = torch.searchsorted(x, y).clamp_(max=k - 1)
        hits += int((torch.gather(x, 1, pos) == y).sum())
    return hits / (n * k)


# --------------------------------------------------------------------- input checking


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None,
               why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is larger than {why} = {maximum}")
    return value


def _as_matrix(name: str, x: Any) -> torch.Tensor:
    """A 2-D float32 view/copy of ``x`` (numpy or torch), on its current device."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise ValueError(f"{name} must be a float array, got dtype {arr.dtype}")
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        with warnings.catch_warnings():
            # Read-only inputs (memmaps, Ray object-store views) are only ever read.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    if not t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be a float array, got dtype {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has zero columns")
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _check_finite(name: str, t: torch.Tensor) -> None:
    rows = max(1, (1 << 24) // max(1, t.shape[1]))
    for s in range(0, t.shape[0], rows):
        block = t[s:s + rows]
        if not bool(torch.isfinite(block).all()):
            bad = int(s + (~torch.isfinite(block)).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"{name} has a non-finite value (first in row {bad})")


def _max_excluded(n_q: int, n_k: int, qg: int, kg: int) -> int:
    """Most keys excluded for one query under positives=(qg, kg).

    Query i excludes keys [g*kg, (g+1)*kg) with g = i // qg, clipped to the key range:
    kg keys whenever the first group is complete, else the n_k < kg keys there are.
    """
    if n_q == 0:
        return 0
    return min(kg, n_k)


# ---------------------------------------------------------------- keys and ordering


def _bits(n: int) -> int:
    """Bits needed to store 0 .. n - 1."""
    return max(1, (n - 1).bit_length())


def _rank_bits(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in [0, 2**32) that strictly *decreases* as the value increases.

    Exact and total on finite floats, with -0.0 and +0.0 mapped to one key (they are
    equal scores, so they must tie and fall back to the index order).
    """
    bits = (values + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    # Flip the magnitude bits of negative floats: the int32 order becomes the float order.
    ascending = bits >> 31
    ascending &= 0x7FFFFFFF
    ascending ^= bits
    rank = ascending.to(torch.int64)
    return rank.neg_().add_(0x7FFFFFFF)


def _value_of(rank: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rank_bits` (int64 in [0, 2**32) -> float32)."""
    ascending = (0x7FFFFFFF - rank).to(torch.int32)
    return (ascending ^ ((ascending >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _make_keys(values: torch.Tensor, group: torch.Tensor, index: torch.Tensor,
               index_bits: int) -> torch.Tensor:
    """``group | score rank | index`` packed in an int64 (group in the top bits)."""
    key = _rank_bits(values)
    key <<= index_bits
    key |= index
    key |= group << (32 + index_bits)
    return key


def _first_k(sorted_keys: torch.Tensor, n_groups: int, k: int, index_bits: int, *,
             group_offset: int = 0, want_values: bool = True
             ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The first k keys of each group ``group_offset .. group_offset + n_groups - 1``.

    Returns ``(values (G, k) or None, indices (G, k), ok (G,))``; rows with
    ``ok == False`` (fewer than k keys) hold garbage and must be recomputed.
    """
    dev = sorted_keys.device
    if sorted_keys.numel() == 0:
        values = torch.zeros(n_groups, k, dtype=torch.float32, device=dev) if want_values else None
        return (values, torch.zeros(n_groups, k, dtype=torch.int64, device=dev),
                torch.zeros(n_groups, dtype=torch.bool, device=dev) if k else
                torch.ones(n_groups, dtype=torch.bool, device=dev))
    group = sorted_keys >> (32 + index_bits)
    if group_offset:
        group -= group_offset
    counts = torch.bincount(group, minlength=n_groups)
    ok = counts >= k
    starts = torch.cumsum(counts, 0) - counts
    take = (starts[:, None] + torch.arange(k, device=dev)).clamp_(max=sorted_keys.numel() - 1)
    chosen = sorted_keys[take]
    indices = chosen & ((1 << index_bits) - 1)
    values = _value_of((chosen >> index_bits) & 0xFFFFFFFF) if want_values else None
    return values, indices, ok


def _sample_rank(k: int, m: int, n: int) -> int:
    """Rank r such that the r-th largest of a uniform m-sample of n scores is, with
    probability ~ 1 - Phi(-_Z), below the k-th largest of all n."""
    if m >= n:
        return k
    f = m / n
    mean = k * f
    r = math.ceil(mean + _Z * math.sqrt(mean * (1.0 - f))) + 1
    return max(1, min(r, m))


def _kth_largest(scores: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """r-th largest along ``dim`` as a float32 threshold; never -inf (so excluded
    entries, which are -inf, never pass ``>=``)."""
    r = min(r, scores.shape[dim])
    t = torch.topk(scores, r, dim=dim, largest=True, sorted=False).values.amin(dim=dim)
    return t.float().clamp_(min=torch.finfo(torch.float32).min)


# --------------------------------------------------------------------------- engine


@contextlib.contextmanager
def _full_fp32_products(device: torch.device) -> Iterator[None]:
    """fp32 means fp32: no TF32 / bf16 shortcuts a caller may have switched on."""
    previous = torch.get_float32_matmul_precision()
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    try:
        if previous != "highest":
            torch.set_float32_matmul_precision("highest")
        if cuda_tf32:
            torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)
        if cuda_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _positive_positions(q_order: torch.Tensor, k_inverse: torch.Tensor, n_k: int,
                        qg: int, kg: int) -> torch.Tensor:
    """(n_q, kg) positions, in the visiting order of keys, of each visited query's
    excluded keys; -1 where the group runs past the last key."""
    dev = q_order.device
    first = (q_order // qg) * kg
    orig = first[:, None] + torch.arange(kg, device=dev)
    valid = orig < n_k
    return torch.where(valid, k_inverse[orig.clamp(max=n_k - 1)], -1)


class _ColumnStore:
    """Column-direction candidates of one tile, as int64 keys
    ``(column in tile | score rank | original query id)``, kept or pending."""

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
        return torch.sort(keys).values


def _search(
    q: torch.Tensor,
    kk: torch.Tensor,
    k_row: int,
    k_col: int,
    *,
    groups: tuple[int, int] | None,
    block_rows: int | None,
    device: str | torch.device | None,
    progress: bool,
    precision: str,
    stats: dict[str, Any] | None,
    tile_cols: int | None = None,
    want_values: bool = True,
    col_dtype: torch.dtype = torch.int64,
) -> tuple[tuple[torch.Tensor | None, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]:
    """Row top-k_row and column top-k_col of ``q @ kk.T`` (band excluded), on CPU.

    Returns ``((row_values, row_ids), (col_values, col_ids))`` with shapes
    (n_q, k_row) and (n_k, k_col): float32 scores (None unless ``want_values``),
    int64 row ids and ``col_dtype`` column ids (original indices).
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if block_rows is not None:
        _check_int("block_rows", block_rows, minimum=1)
    if tile_cols is not None:
        _check_int("tile_cols", tile_cols, minimum=1)
    dev = _resolve_device(device)
    if stats is None:
        stats = {}
    with torch.no_grad(), _full_fp32_products(dev):
        q = q.to(dev, torch.float32)
        kk = kk.to(dev, torch.float32)
        if precision == "fp32":
            return _engine(q, kk, k_row, k_col, groups, block_rows, tile_cols, progress,
                           stats, torch.float32, want_values, col_dtype)
        # bf16: exact selection by bf16 scores of a widened shortlist, then fp32 rescoring.
        wide_row = _shortlist(k_row, kk.shape[0], q.shape[0], groups, rows=True)
        wide_col = _shortlist(k_col, q.shape[0], kk.shape[0], groups, rows=False)
        (_, row_ids), (_, col_ids) = _engine(q, kk, wide_row, wide_col, groups, block_rows,
                                             tile_cols, progress, stats, torch.bfloat16,
                                             False)
        rows = _rescore(q, kk, row_ids, k_row)
        col_v, col_i = _rescore(kk, q, col_ids, k_col)
        return rows, (col_v, col_i.to(col_dtype))


def _shortlist(k: int, n_other: int, n_self: int, groups: tuple[int, int] | None,
               rows: bool) -> int:
    if k == 0:
        return 0
    excluded = 0
    if groups is not None:
        qg, kg = groups
        excluded = (_max_excluded(n_self, n_other, qg, kg) if rows
                    else _max_excluded(n_self, n_other, kg, qg))
    return min(n_other - excluded, max(k, math.ceil(_BF16_SHORTLIST * k)))


def _pair_scores(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 ``a[i] . b[ids[i, j]]`` for an (n, w) id table: (n, w) scores.

    A sampled matrix product (SDDMM) reads each row of ``a`` once and never materialises
    the gathered rows of ``b``: ~10x faster than gather + bmm on CPU (263 vs 2584 ns per
    pair at d = 1024, measured).
    """
    n, wide = ids.shape
    if n == 0 or wide == 0:
        return torch.empty(n, wide, dtype=torch.float32, device=a.device)
    crow = torch.arange(0, (n + 1) * wide, wide, device=a.device)
    with warnings.catch_warnings():
        # "sparse CSR support is in beta" / "invariant checks disabled": we build it valid.
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, ids.reshape(-1), torch.zeros(n * wide,
                                          device=a.device), size=(n, b.shape[0]))
        out = torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0)
    return out.values().view(n, wide)


def _rescore(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scores of ``a[i] . b[ids[i, :]]`` and the top k of each row (score
    descending, index ascending). ``ids`` rows must be free of duplicates."""
    n, wide = ids.shape
    out_v = torch.empty(n, k, dtype=torch.float32)
    out_i = torch.empty(n, k, dtype=torch.int64)
    if n == 0 or k == 0:
        return out_v, out_i
    dev = a.device
    index_bits = _bits(b.shape[0])
    # Rows per chunk: keys must fit (row | rank | id) and a chunk is ~2**22 pairs.
    chunk = max(1, min(1 << (31 - index_bits), (1 << 22) // wide))
    for s in range(0, n, chunk):
        # CSR column indices must ascend within a row.
        sel = torch.sort(ids[s:s + chunk].to(dev), dim=1).values
        scores = _pair_scores(a[s:s + chunk], b, sel)
        group = torch.arange(sel.shape[0], device=dev)[:, None].expand_as(sel)
        keys = torch.sort(_make_keys(scores.reshape(-1), group.reshape(-1), sel.reshape(-1),
                                     index_bits)).values
        v, i, _ = _first_k(keys, sel.shape[0], k, index_bits)
        out_v[s:s + chunk] = v.cpu()
        out_i[s:s + chunk] = i.cpu()
    return out_v, out_i


def _tile_plan(n_q: int, n_k: int, columns: bool, block_rows: int | None,
               tile_cols: int | None) -> tuple[int, int]:
    """(rows per block, columns per tile) for ``n_q x n_k`` products."""
    kb, qb = _bits(n_k), _bits(n_q)
    # Row keys hold (row in block | rank | key id): rows per block <= 2**(31 - kb).
    br = min(block_rows or _DEFAULT_BLOCK_ROWS, n_q, 1 << (31 - kb))
    nt = min(tile_cols or _DEFAULT_TILE_COLS, n_k)
    if tile_cols is None and nt < n_k and br * nt < (1 << 22):
        # Small blocks (block_rows=1 ...): wider tiles cost nothing and save Python loops.
        nt = min(n_k, max(nt, (1 << 22) // br))
    if columns:
        # Column keys hold (column in tile | rank | query id): <= 2**(31 - qb) columns.
        nt = min(nt, 1 << (31 - qb))
    # Near-equal widths that are multiples of 64: sgemm runs ~1.5x slower on odd widths
    # (3847 vs 3840 columns, measured), and a narrow last tile wastes a pass.
    if nt < n_k:
        nt = min(nt, -(-(-(-n_k // -(-n_k // nt))) // 64) * 64)
    return br, nt


def _engine(
    q: torch.Tensor,
    kk: torch.Tensor,
    k_row: int,
    k_col: int,
    groups: tuple[int, int] | None,
    block_rows: int | None,
    tile_cols: int | None,
    progress: bool,
    stats: dict[str, Any],
    score_dtype: torch.dtype,
    want_values: bool,
    col_dtype: torch.dtype = torch.int64,
) -> tuple[tuple[torch.Tensor | None, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]:
    dev = q.device
    n_q, n_k = q.shape[0], kk.shape[0]
    counters = dict(row_candidates=0, col_candidates=0, row_recomputed=0, col_recomputed=0,
                    compactions=0)
    stats.update(counters)
    if (k_row == 0 and k_col == 0) or n_q == 0 or n_k == 0:
        return ((torch.empty(n_q, k_row) if want_values else None,
                 torch.empty(n_q, k_row, dtype=torch.int64)),
                (torch.empty(n_k, k_col) if want_values else None,
                 torch.empty(n_k, k_col, dtype=col_dtype)))
    if _bits(n_k) > 31 or _bits(n_q) > 31:
        raise ValueError("more than 2**31 queries or keys are not supported")
    threads = torch.get_num_threads() if dev.type == "cpu" else 1
    n_workers = max(1, min(threads, _MAX_WORKERS)) if _WORKERS else 1
    if block_rows is None and n_workers > 1:
        # Enough blocks to keep every worker busy to the end (>= 256 rows for sgemm).
        block_rows = min(_DEFAULT_BLOCK_ROWS,
                         max(256, -(-n_q // (4 * n_workers)) + 63) // 64 * 64)
    br, nt = _tile_plan(n_q, n_k, bool(k_col), block_rows, tile_cols)
    n_blocks = -(-n_q // br)
    n_workers = min(n_workers, n_blocks)

    # Visiting order: pseudo-random, so a tile / a row block is a uniform sample for the
    # thresholds. Results never depend on it (keys hold original ids).
    gen = torch.Generator().manual_seed(_ORDER_SEED)
    keys_permuted = bool(k_row) and nt < n_k
    queries_permuted = bool(k_col) and br < n_q
    k_order = (torch.randperm(n_k, generator=gen) if keys_permuted else torch.arange(n_k)).to(dev)
    q_order = (torch.randperm(n_q, generator=gen) if queries_permuted
               else torch.arange(n_q)).to(dev)
    qp = (q[q_order] if queries_permuted else q).to(score_dtype)
    kp = (torch.index_select(kk, 0, k_order) if keys_permuted else kk).to(score_dtype)
    shared = _Shared(n_q=n_q, n_k=n_k, k_row=k_row, k_col=k_col, groups=groups, br=br, nt=nt,
                     qp=qp, kp=kp, k_order=k_order, q_order=q_order,
                     keys_permuted=keys_permuted, queries_permuted=queries_permuted,
                     want_values=want_values, col_dtype=col_dtype)
    workers = [_BlockWorker(shared, score_dtype) for _ in range(n_workers)]
    stats.update(block_rows=br, tile_cols=nt, workers=n_workers)

    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_blocks, desc="mining", unit="block")
    try:
        _parallel(workers, [b * br for b in range(n_blocks)], _BlockWorker.block, bar)
    finally:
        if bar is not None:
            bar.close()
    del qp, kp
    shared.qp = shared.kp = None  # the permuted copies are no longer needed
    t1 = time.perf_counter()
    short_cols = _merge_columns(shared, workers) if k_col else []
    short_rows = [ids for w in workers for ids in w.short_rows]
    t2 = time.perf_counter()
    if short_cols:
        ids = torch.cat(short_cols)
        counters["col_recomputed"] = ids.numel()
        swapped = None if groups is None else (groups[1], groups[0])
        _recompute(kk, q, ids, k_col, swapped, shared.col_v, shared.col_i, score_dtype)
    if short_rows:
        ids = torch.cat(short_rows)
        counters["row_recomputed"] = ids.numel()
        _recompute(q, kk, ids, k_row, groups, shared.row_v, shared.row_i, score_dtype)
    t3 = time.perf_counter()
    for w in workers:
        for key in ("row_candidates", "col_candidates", "compactions"):
            counters[key] += w.counters[key]
    stats.update(counters)
    timing = {"blocks": t1 - t0, "merge_columns": t2 - t1, "recompute": t3 - t2,
              "products": sum(w.timing["products"] for w in workers) / n_workers,
              "selection": sum(w.timing["selection"] for w in workers) / n_workers}
    stats.update({f"seconds_{key}": round(val, 3) for key, val in timing.items()})
    return (shared.row_v, shared.row_i), (shared.col_v, shared.col_i)


class _Shared:
    """State shared by the workers: problem, visiting order, inputs, outputs."""

    def __init__(self, *, n_q: int, n_k: int, k_row: int, k_col: int,
                 groups: tuple[int, int] | None, br: int, nt: int, qp: torch.Tensor,
                 kp: torch.Tensor, k_order: torch.Tensor, q_order: torch.Tensor,
                 keys_permuted: bool, queries_permuted: bool, want_values: bool,
                 col_dtype: torch.dtype) -> None:
        dev = k_order.device
        self.n_q, self.n_k = n_q, n_k
        self.k_row, self.k_col, self.br, self.nt = k_row, k_col, br, nt
        self.qp: torch.Tensor | None = qp
        self.kp: torch.Tensor | None = kp
        self.tiles = [(c0, min(c0 + nt, n_k)) for c0 in range(0, n_k, nt)]
        # t2i candidates are kept per slice of _COL_SLICE columns of a tile, so that the
        # final sorts are of a few 100k keys each (see _SORT_ROWS).
        self.col_slices = [[(a, min(a + _COL_SLICE, c1 - c0))
                            for a in range(0, c1 - c0, _COL_SLICE)] for c0, c1 in self.tiles]
        self.k_order, self.q_order = k_order, q_order
        self.keys_permuted, self.queries_permuted = keys_permuted, queries_permuted
        self.want_values = want_values
        self.kb, self.qb = _bits(n_k), _bits(n_q)
        # Power-of-two row stride: a flat position in a tile splits into (row, column)
        # with a shift and a mask instead of a division; sgemm writes that padded
        # layout in place at full speed.
        self.ld = 1 << (nt - 1).bit_length()
        self.ld_bits = self.ld.bit_length() - 1
        self.pos = None
        if groups is not None:
            k_inverse = torch.empty_like(k_order)
            k_inverse[k_order] = torch.arange(n_k, device=dev)
            self.pos = _positive_positions(q_order, k_inverse, n_k, *groups)
        self.m_row = min(nt, _ROW_SAMPLE)
        self.r_row = _sample_rank(k_row, self.m_row, n_k) if k_row else 0
        self.m_col = min(br, _COL_SAMPLE)
        self.r_col = _sample_rank(k_col, self.m_col, n_q) if k_col else 0
        self.row_v = torch.empty(n_q, k_row, dtype=torch.float32) if want_values else None
        self.row_i = torch.empty(n_q, k_row, dtype=torch.int64)
        self.col_v = torch.empty(n_k, k_col, dtype=torch.float32) if want_values else None
        self.col_i = torch.empty(n_k, k_col, dtype=col_dtype)


class _BlockWorker:
    """Products and selection for whole row blocks, one block at a time.

    Workers share nothing they write except disjoint output rows: each keeps its own
    tile buffer, masks, row candidates and t2i candidates (with its own column
    thresholds, estimated from the first block it gets), merged at the end.
    """

    def __init__(self, shared: _Shared, score_dtype: torch.dtype) -> None:
        sh = shared
        dev = sh.k_order.device
        self.sh = sh
        self.buf = torch.empty(sh.br * sh.ld, dtype=score_dtype, device=dev)
        self.sample_buf = torch.empty(sh.br * sh.m_row if sh.k_row else 0, dtype=score_dtype,
                                      device=dev)
        self.row_mask = torch.zeros(sh.br * sh.ld if sh.k_row else 0, dtype=torch.bool,
                                    device=dev)
        self.col_mask = torch.zeros(sh.br * _COL_SLICE if sh.k_col else 0, dtype=torch.bool,
                                    device=dev)
        self.mask_shape: tuple[int, int] | None = None
        self.col_stores = [[_ColumnStore(dev) for _ in sh.col_slices[c]]
                           for c in range(len(sh.tiles))] if sh.k_col else []
        # Threshold in force (raised by compactions) and the first estimate, which the
        # merge must check against the final k-th score.
        self.col_threshold: torch.Tensor | None = None
        self.col_estimate: torch.Tensor | None = None
        self.short_rows: list[torch.Tensor] = []
        self.counters = dict(row_candidates=0, col_candidates=0, compactions=0)
        self.timing = {"products": 0.0, "selection": 0.0}

    def block(self, r0: int) -> None:
        sh = self.sh
        rows_here = min(sh.br, sh.n_q - r0)
        ld, dev = sh.ld, self.buf.device
        q_blk = sh.qp[r0:r0 + rows_here]
        q_ids = sh.q_order[r0:r0 + rows_here]
        groups = [(g0, min(g0 + _SORT_ROWS, rows_here)) for g0 in range(0, rows_here,
                                                                         _SORT_ROWS)]
        cuts = torch.tensor([g0 * ld for g0, _ in groups[1:]], dtype=torch.int64, device=dev)
        row_parts: list[list[torch.Tensor]] = [[] for _ in groups]
        row_threshold = None
        first_block = self.col_threshold is None
        if sh.k_col and first_block:
            self.col_threshold = torch.empty(sh.n_k, dtype=torch.float32, device=dev)
            self.col_estimate = torch.empty(sh.n_k, dtype=torch.float32, device=dev)
        for c, (c0, c1) in enumerate(sh.tiles):
            width = c1 - c0
            t0 = time.perf_counter()
            s = self.buf[: rows_here * ld].view(rows_here, ld)[:, :width]
            torch.mm(q_blk, sh.kp[c0:c1].T, out=s)
            t1 = time.perf_counter()
            if self.mask_shape != (rows_here, width):
                # Padding must read as "no hit"; stale hits survive a shape change.
                self.row_mask.zero_()
                self.mask_shape = (rows_here, width)
            if sh.pos is not None:
                pos_blk = sh.pos[r0:r0 + rows_here]
                hit_r, hit_t = ((pos_blk >= c0) & (pos_blk < c1)).nonzero(as_tuple=True)
                s[hit_r, pos_blk[hit_r, hit_t] - c0] = -torch.inf
            if sh.k_row:
                if row_threshold is None:
                    # topk is 2x slower on a strided view than on a packed copy.
                    sample = self.sample_buf[: rows_here * sh.m_row].view(rows_here, sh.m_row)
                    sample.copy_(s[:, : sh.m_row])
                    row_threshold = _kth_largest(sample, sh.r_row, dim=1)[:, None]
                region = self.row_mask[: rows_here * ld]
                torch.ge(s, row_threshold, out=region.view(rows_here, ld)[:, :width])
                flat = region.nonzero().view(-1)
                keys = _make_keys(self.buf.take(flat).float(), flat >> sh.ld_bits,
                                  sh.k_order[c0:c1][flat & (ld - 1)], sh.kb)
                # Row-major hits: each sort group of rows is one slice.
                for i, part in enumerate(torch.tensor_split(
                        keys, torch.searchsorted(flat, cuts).tolist())):
                    row_parts[i].append(part)
            if sh.k_col:
                if first_block:
                    estimate = _kth_largest(s[: sh.m_col], sh.r_col, dim=0)
                    self.col_threshold[c0:c1] = estimate
                    self.col_estimate[c0:c1] = estimate
                for j, (a, z) in enumerate(sh.col_slices[c]):
                    threshold = self.col_threshold[c0 + a:c0 + z]
                    region = self.col_mask[: rows_here * _COL_SLICE].view(rows_here, _COL_SLICE)
                    if z - a < _COL_SLICE:
                        region[:, z - a:].zero_()  # padding must read as "no hit"
                    torch.ge(s[:, a:z], threshold, out=region[:, : z - a])
                    flat = region.view(-1).nonzero().view(-1)
                    row = flat >> _COL_SLICE_BITS
                    col = flat & (_COL_SLICE - 1)
                    store = self.col_stores[c][j]
                    store.add(_make_keys(self.buf.take((row << sh.ld_bits) + (col + a)).float(),
                                         col, q_ids[row], sh.qb))
                    self.counters["col_candidates"] += flat.numel()
                    if store.size > max(_COLUMN_CAP_MIN,
                                        (1.0 + _COLUMN_SLACK) * (z - a) * sh.k_col):
                        _compact(store, threshold, sh.k_col, sh.qb)
                        self.counters["compactions"] += 1
            self.timing["products"] += t1 - t0
            self.timing["selection"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        for i, (g0, g1) in enumerate(groups):
            if not sh.k_row:
                break
            parts = row_parts[i]
            keys = torch.sort(parts[0] if len(parts) == 1 else torch.cat(parts)).values
            row_parts[i] = []
            self.counters["row_candidates"] += keys.numel()
            v, ids, ok = _first_k(keys, g1 - g0, sh.k_row, sh.kb, group_offset=g0,
                                  want_values=sh.want_values)
            _store(sh.row_v, sh.row_i, v, ids, q_ids[g0:g1], r0 + g0, sh.queries_permuted)
            if not bool(ok.all()):
                self.short_rows.append(q_ids[g0:g1][~ok])
        self.timing["selection"] += time.perf_counter() - t0


def _parallel(workers: list[_BlockWorker], tasks: list[Any],
              run: Callable[[_BlockWorker, Any], None], bar: Any = None) -> None:
    """Run every task once, each by whichever worker is free (one worker: on this thread).

    Several workers run on helper threads, each with torch set to one thread: a worker
    alternates long sgemm calls with dozens of short, memory-bound selection ops, and
    single-threaded workers keep all cores busy (one multiplies while another selects)
    without any OpenMP team. Run with torch's intra-op threads instead, every short op
    is a parallel region ending in a barrier, and an idle team thread spins after each
    one; on the shared 2-core box a barrier cost milliseconds whenever another process
    wanted a core (a 345k-key sort: 6 ms -> 190 ms, measured).
    """
    if len(workers) == 1:
        for task in tasks:
            run(workers[0], task)
            if bar is not None:
                bar.update(1)
        return
    import threading

    lock = threading.Lock()
    pending = list(reversed(tasks))
    errors: list[BaseException] = []

    def loop(worker: _BlockWorker) -> None:
        # Sets this thread's OpenMP / MKL thread count; the process-wide default it
        # also sets is put back on the way out.
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                while True:
                    with lock:
                        if not pending or errors:
                            return
                        task = pending.pop()
                    run(worker, task)
                    if bar is not None:
                        with lock:
                            bar.update(1)
        except BaseException as exc:  # re-raised on the caller's thread
            with lock:
                errors.append(exc)
        finally:
            torch.set_num_threads(previous)

    threads = [threading.Thread(target=loop, args=(w,), name=f"aoq-mining-{i}", daemon=True)
               for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException as exc:  # e.g. KeyboardInterrupt: let the workers stop too
        with lock:
            errors.append(exc)
        raise
    if errors:
        raise errors[0]


def _merge_columns(shared: _Shared, workers: list[_BlockWorker]) -> list[torch.Tensor]:
    """Merge the workers' t2i candidates slice by slice; returns the columns to recompute.

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
        v, i, ok = _first_k(store.sorted_keys(), g1 - g0, sh.k_col, sh.qb, want_values=True)
        ok &= v[:, -1] >= estimate[g0:g1]
        ids = sh.k_order[g0:g1]
        _store(sh.col_v, sh.col_i, v if sh.want_values else None, i, ids, g0,
               sh.keys_permuted)
        if not bool(ok.all()):
            short.append(ids[~ok])  # list.append is atomic

    _parallel(workers, tasks, merge)
    return short


def _store(out_v: torch.Tensor | None, out_i: torch.Tensor, v: torch.Tensor | None,
           i: torch.Tensor, ids: torch.Tensor, start: int, permuted: bool) -> None:
    """Write result rows for original ids ``ids`` (a plain slice when not permuted)."""
    i = i.to("cpu", out_i.dtype)
    if permuted:
        dest = ids.cpu()
        out_i.index_copy_(0, dest, i)  # ~3x faster than out_i[dest] = ...
        if out_v is not None:
            out_v.index_copy_(0, dest, v.cpu())
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
        kth_value = _value_of((kth >> index_bits) & 0xFFFFFFFF)
        threshold[full] = torch.maximum(threshold[full], kth_value)


def _recompute(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, k: int,
               groups: tuple[int, int] | None, out_v: torch.Tensor | None,
               out_i: torch.Tensor, score_dtype: torch.dtype) -> None:
    """Full rows ``a[ids] @ b.T`` (band excluded), top k by the same stable key order."""
    dev = a.device
    n_b = b.shape[0]
    index_bits = _bits(n_b)
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
        keys = torch.sort(_make_keys(scores[hr, hc], hr, hc, index_bits)).values
        v, i, _ = _first_k(keys, sel.numel(), k, index_bits, want_values=out_v is not None)
        _store(out_v, out_i, v, i, sel, 0, True)
