"""Exact blocked top-K search: the offline candidate tables of AOQ (design.md §1, §5, §7).

``mine_candidates`` builds both tables from one pass of matrix products:

* ``i2t`` (n_images, k_captions) int64: per image, its k_captions highest-scoring
  captions, the image's own captions (columns ``cpi*i .. cpi*i + cpi - 1``) excluded;
* ``t2i`` (n_captions, k_images) int32: per caption ``j``, its k_images highest-scoring
  images, its own image ``j // cpi`` excluded.

Scores are fp32 inner products. Every row is sorted by descending score, equal scores
by ascending index, so the tables are a pure function of the embeddings (and match a
brute-force stable sort of the full score matrix).

How it is fast (and still exact)
--------------------------------
The products are computed tile by tile (``block_rows`` images x ``tile_cols`` captions,
sized to stay in cache). A tile is never sorted. Instead every row (and every column)
gets a *threshold* below which its entries are dropped on the spot; only survivors
become candidates. A threshold is an estimate of the row's k-th largest score, read off
a random sample of the row: rows and columns are visited in a fixed pseudo-random order,
so the first tile of a row block is a uniform sample of that row's scores and the first
row block a uniform sample of every column's. The sample's rank is set a few standard
deviations above its expected k-th rank, so a row keeps about ``k + 3*sqrt(k/f)``
candidates (f = sampled fraction) and almost surely at least k. The estimate only
decides speed, never the result: a row whose candidates (all scores >= its threshold)
number at least k provably holds its exact top k among them; the rare row with fewer is
recomputed in full at the end. Columns accumulate candidates across row blocks; they are
compacted to their running top k now and then, which also raises their thresholds to
the running k-th score (a lower bound of the final one, so again exact).

Ties cost nothing: a candidate is stored as one int64 key ``(group, rank of its score,
original index)``, where the 32-bit score rank is an order-preserving integer image of
the float (-0.0 == +0.0) and the index is the *original* one. Sorting the keys (a radix
sort in torch) orders every group by score descending, then index ascending, exactly;
so the pseudo-random visiting order never shows in the result.

The own-caption/own-image exclusion is the same set of entries in both directions: they
are set to -inf in each tile before any selection.

Memory (beyond inputs and outputs): one permuted copy of the inputs, a tile of
``block_rows * tile_cols`` scores plus its boolean mask, the candidate keys of one row
block (~ ``block_rows * (k_captions + 3*sqrt(k_captions*n_captions/tile_cols))`` int64),
and the column candidates, at most ``(1 + _COLUMN_SLACK) * n_captions * k_images`` int64
keys plus one tile's worth. Nothing is ever n_images x n_captions.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
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
#: Default tile: 1024 x 4096 fp32 (16 MiB) runs MKL sgemm at ~95% of its large-matrix
#: speed on the 2-core box, and the selection passes over it mostly hit cache.
_DEFAULT_BLOCK_ROWS = 1024
_DEFAULT_TILE_COLS = 4096
#: Columns of the first tile whose scores set a row's threshold (a uniform sample, as
#: keys are visited in random order): more is a tighter threshold, fewer is a cheaper
#: topk; 2048 of 50k captions keeps ~1.25 k candidates per row at K = 2000.
_ROW_SAMPLE = 2048
#: Rows of the first row block whose scores set a column's threshold (same idea).
_COL_SAMPLE = 512
#: Candidates are kept and sorted in groups of this many rows (row direction) / columns
#: (column direction): a few 100k int64 keys radix-sort ~2x faster per key than millions
#: (they stay in cache), and the grouping is free (it follows row / column slices).
_SORT_ROWS = 128
_SORT_COLS = 256
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
        device=device, progress=progress, precision=precision, stats=stats,
        want_values=False,
    )
    i2t = rows[1].numpy().astype(np.int64, copy=False)
    t2i = cols[1].numpy().astype(np.int32)
    return i2t, t2i


def exact_topk(
    queries: Any,
    keys: Any,
    k: int,
    *,
    positives: tuple[int, int] | None = None,
    block_rows: int | None = None,
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
        block_rows, device, progress, precision, stats: as in :func:`mine_candidates`.

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
    rows, _ = _search(q, kk, k, 0, groups=groups, block_rows=block_rows, device=device,
                      progress=progress, precision=precision, stats=stats)
    return rows[0].numpy(), rows[1].numpy()


def overlap_at_k(a: Any, b: Any) -> float:
    """Mean over rows of |set(a[i]) & set(b[i])| / k for two (n, k) index tables.

    1.0 means every row holds the same ids (in any order). Used to report how close the
    bf16 mode (or any approximate table) is to the exact one.
    """
    ta = torch.as_tensor(np.asarray(a)).to(torch.int64)
    tb = torch.as_tensor(np.asarray(b)).to(torch.int64)
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


class _ColumnGroup:
    """Column-direction candidates of one group of columns of a tile, as int64 keys
    ``(column in tile | score rank | original query id)``, kept or pending."""

    __slots__ = ("device", "offset", "width", "parts", "size")

    def __init__(self, device: torch.device, offset: int, width: int) -> None:
        self.device = device
        self.offset = offset  # column in tile of the group's first column
        self.width = width
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, keys: torch.Tensor) -> None:
        self.parts.append(keys)
        self.size += keys.numel()

    def sorted_keys(self) -> torch.Tensor:
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
) -> tuple[tuple[torch.Tensor | None, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]:
    """Row top-k_row and column top-k_col of ``q @ kk.T`` (band excluded), on CPU.

    Returns ``((row_values, row_ids), (col_values, col_ids))`` with shapes
    (n_q, k_row) and (n_k, k_col): float32 scores (None unless ``want_values``) and int64
    original indices.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if block_rows is not None:
        _check_int("block_rows", block_rows, minimum=1)
    dev = _resolve_device(device)
    if stats is None:
        stats = {}
    with torch.no_grad(), _full_fp32_products(dev):
        q = q.to(dev, torch.float32)
        kk = kk.to(dev, torch.float32)
        if precision == "fp32":
            return _engine(q, kk, k_row, k_col, groups, block_rows, tile_cols, progress,
                           stats, torch.float32, want_values)
        # bf16: exact selection by bf16 scores of a widened shortlist, then fp32 rescoring.
        wide_row = _shortlist(k_row, kk.shape[0], q.shape[0], groups, rows=True)
        wide_col = _shortlist(k_col, q.shape[0], kk.shape[0], groups, rows=False)
        (_, row_ids), (_, col_ids) = _engine(q, kk, wide_row, wide_col, groups, block_rows,
                                             tile_cols, progress, stats, torch.bfloat16,
                                             False)
        rows = _rescore(q, kk, row_ids, k_row)
        cols = _rescore(kk, q, col_ids, k_col)
        return rows, cols


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


def _rescore(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scores of ``a[i] . b[ids[i, :]]`` and the top k of each row (stable order)."""
    n, wide = ids.shape
    out_v = torch.empty(n, k, dtype=torch.float32)
    out_i = torch.empty(n, k, dtype=torch.int64)
    if n == 0 or k == 0:
        return out_v, out_i
    dev = a.device
    index_bits = _bits(b.shape[0])
    # Bounded gather: at most ~64 MiB of gathered rows at a time.
    chunk = max(1, min(1 << (31 - index_bits), (1 << 24) // max(1, wide * a.shape[1])))
    for s in range(0, n, chunk):
        sel = ids[s:s + chunk].to(dev)
        scores = torch.bmm(b[sel], a[s:s + chunk, :, None]).squeeze(2)
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
) -> tuple[tuple[torch.Tensor | None, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]:
    dev = q.device
    n_q, n_k = q.shape[0], kk.shape[0]
    row_v = torch.empty(n_q, k_row, dtype=torch.float32) if want_values else None
    row_i = torch.empty(n_q, k_row, dtype=torch.int64)
    col_v = torch.empty(n_k, k_col, dtype=torch.float32) if want_values else None
    col_i = torch.empty(n_k, k_col, dtype=torch.int64)
    stats.update(row_candidates=0, col_candidates=0, row_recomputed=0, col_recomputed=0,
                 compactions=0)
    if (k_row == 0 and k_col == 0) or n_q == 0 or n_k == 0:
        return (row_v, row_i), (col_v, col_i)

    kb, qb = _bits(n_k), _bits(n_q)
    if kb > 31 or qb > 31:
        raise ValueError("more than 2**31 queries or keys are not supported")
    br, nt = _tile_plan(n_q, n_k, bool(k_col), block_rows, tile_cols)
    stats.update(block_rows=br, tile_cols=nt)

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
    pos = None
    if groups is not None:
        k_inverse = torch.empty_like(k_order)
        k_inverse[k_order] = torch.arange(n_k, device=dev)
        pos = _positive_positions(q_order, k_inverse, n_k, *groups)

    m_row = min(nt, _ROW_SAMPLE)
    r_row = _sample_rank(k_row, m_row, n_k) if k_row else 0
    m_col = min(br, _COL_SAMPLE)
    r_col = _sample_rank(k_col, m_col, n_q) if k_col else 0
    col_threshold = torch.empty(n_k, dtype=torch.float32, device=dev)
    tiles = [(c0, min(c0 + nt, n_k)) for c0 in range(0, n_k, nt)]
    # Column groups of each tile (sorted separately; see _SORT_COLS).
    col_groups = [[_ColumnGroup(dev, g0, min(_SORT_COLS, c1 - c0 - g0))
                   for g0 in range(0, c1 - c0, _SORT_COLS)] for c0, c1 in tiles] if k_col else []
    col_cap = max(1 << 16, int((1.0 + _COLUMN_SLACK) * _SORT_COLS * k_col))

    # Tiles are written with a power-of-two row stride, so a flat position in the tile
    # splits into (row, column) with a shift and a mask instead of a division; sgemm
    # writes the padded layout in place at the same speed. The column direction filters
    # the transposed tile (same trick), so its candidates come out column-major and
    # each group of columns is one contiguous slice.
    ld = 1 << (nt - 1).bit_length()
    ldr = 1 << (br - 1).bit_length()
    score_buf = torch.empty(br * ld, dtype=score_dtype, device=dev)
    row_mask = torch.zeros(br * ld if k_row else 0, dtype=torch.bool, device=dev)
    col_mask = torch.zeros(nt * ldr if k_col else 0, dtype=torch.bool, device=dev)
    mask_shape = None
    short_rows: list[torch.Tensor] = []
    # Wall-clock split, reported in ``stats`` (CPU times; on CUDA, launch times only).
    timing = {"products": 0.0, "select": 0.0, "sort": 0.0}
    blocks = range(0, n_q, br)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blocks), desc="mining", unit="block")
    try:
        for b, r0 in enumerate(blocks):
            r1 = min(r0 + br, n_q)
            rows_here = r1 - r0
            q_blk = qp[r0:r1]
            q_ids = q_order[r0:r1]
            pos_blk = pos[r0:r1] if pos is not None else None
            subs = [(g0, min(g0 + _SORT_ROWS, rows_here))
                    for g0 in range(0, rows_here, _SORT_ROWS)]
            sub_cuts = torch.tensor([g0 * ld for g0, _ in subs[1:]], dtype=torch.int64,
                                    device=dev)
            row_parts: list[list[torch.Tensor]] = [[] for _ in subs]
            row_threshold = None
            for c, (c0, c1) in enumerate(tiles):
                width = c1 - c0
                if mask_shape != (rows_here, width):
                    # Padding must read as "no hit"; stale hits survive a shape change.
                    row_mask.zero_()
                    col_mask.zero_()
                    mask_shape = (rows_here, width)
                s = score_buf[: rows_here * ld].view(rows_here, ld)[:, :width]
                t0 = time.perf_counter()
                torch.mm(q_blk, kp[c0:c1].T, out=s)
                t1 = time.perf_counter()
                timing["products"] += t1 - t0
                if pos_blk is not None:
                    hit_r, hit_t = ((pos_blk >= c0) & (pos_blk < c1)).nonzero(as_tuple=True)
                    s[hit_r, pos_blk[hit_r, hit_t] - c0] = -torch.inf
                if k_row:
                    if row_threshold is None:
                        sample = s[:, :m_row].contiguous()  # topk is 2x slower on a view
                        row_threshold = _kth_largest(sample, r_row, dim=1)[:, None]
                        del sample
                    region = row_mask[: rows_here * ld]
                    torch.ge(s, row_threshold, out=region.view(rows_here, ld)[:, :width])
                    flat = region.nonzero().view(-1)
                    keys = _make_keys(score_buf.take(flat).float(), flat >> (ld.bit_length() - 1),
                                      k_order[c0:c1][flat & (ld - 1)], kb)
                    if len(subs) == 1:
                        row_parts[0].append(keys)
                    else:
                        cuts = torch.searchsorted(flat, sub_cuts).tolist()
                        for j, part in enumerate(torch.tensor_split(keys, cuts)):
                            row_parts[j].append(part)
                if k_col:
                    if b == 0:
                        col_threshold[c0:c1] = _kth_largest(s[:m_col], r_col, dim=0)
                    region = col_mask[: width * ldr]
                    torch.ge(s.T, col_threshold[c0:c1, None],
                             out=region.view(width, ldr)[:, :rows_here])
                    flat = region.nonzero().view(-1)
                    col = flat >> (ldr.bit_length() - 1)
                    row = flat & (ldr - 1)
                    values = score_buf.take((row << (ld.bit_length() - 1)) | col).float()
                    keys = _make_keys(values, col, q_ids[row], qb)
                    stats["col_candidates"] += keys.numel()
                    tile_groups = col_groups[c]
                    if len(tile_groups) == 1:
                        parts = (keys,)
                    else:
                        bounds = torch.tensor([g.offset * ldr for g in tile_groups[1:]],
                                              dtype=torch.int64, device=dev)
                        parts = torch.tensor_split(keys, torch.searchsorted(flat, bounds).tolist())
                    for group, part in zip(tile_groups, parts):
                        group.add(part)
                        if group.size > col_cap:
                            g0 = c0 + group.offset
                            _compact(group, col_threshold[g0:g0 + group.width], k_col, qb)
                            stats["compactions"] += 1
                timing["select"] += time.perf_counter() - t1
            t0 = time.perf_counter()
            if k_row:
                for j, (g0, g1) in enumerate(subs):
                    parts = row_parts[j]
                    keys = torch.sort(parts[0] if len(parts) == 1 else torch.cat(parts)).values
                    row_parts[j] = []
                    stats["row_candidates"] += keys.numel()
                    v, i, ok = _first_k(keys, g1 - g0, k_row, kb, group_offset=g0,
                                        want_values=want_values)
                    _store(row_v, row_i, v, i, q_ids[g0:g1], r0 + g0, queries_permuted)
                    if not bool(ok.all()):
                        short_rows.append(q_ids[g0:g1][~ok])
            timing["sort"] += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    del score_buf, row_mask, col_mask
    t0 = time.perf_counter()

    if k_col:
        short_cols = []
        for (c0, _), tile_groups in zip(tiles, col_groups):
            for group in tile_groups:
                g0, g1 = c0 + group.offset, c0 + group.offset + group.width
                v, i, ok = _first_k(group.sorted_keys(), group.width, k_col, qb,
                                    group_offset=group.offset, want_values=want_values)
                _store(col_v, col_i, v, i, k_order[g0:g1], g0, keys_permuted)
                if not bool(ok.all()):
                    short_cols.append(k_order[g0:g1][~ok])
        if short_cols:
            ids = torch.cat(short_cols)
            stats["col_recomputed"] = ids.numel()
            swapped = None if groups is None else (groups[1], groups[0])
            _recompute(kk, q, ids, k_col, swapped, col_v, col_i, score_dtype)
    if short_rows:
        ids = torch.cat(short_rows)
        stats["row_recomputed"] = ids.numel()
        _recompute(q, kk, ids, k_row, groups, row_v, row_i, score_dtype)
    timing["finish"] = time.perf_counter() - t0
    stats.update({f"seconds_{key}": round(val, 3) for key, val in timing.items()})
    return (row_v, row_i), (col_v, col_i)


def _store(out_v: torch.Tensor | None, out_i: torch.Tensor, v: torch.Tensor | None,
           i: torch.Tensor, ids: torch.Tensor, start: int, permuted: bool) -> None:
    """Write result rows for original ids ``ids`` (a plain slice when not permuted)."""
    if permuted:
        dest = ids.cpu()
        out_i.index_copy_(0, dest, i.cpu())  # ~3x faster than out_i[dest] = ...
        if out_v is not None:
            out_v.index_copy_(0, dest, v.cpu())
    else:
        out_i[start:start + i.shape[0]] = i.cpu()
        if out_v is not None:
            out_v[start:start + i.shape[0]] = v.cpu()


def _compact(group: _ColumnGroup, threshold: torch.Tensor, k: int, index_bits: int) -> None:
    """Keep each column's running top k, and raise its threshold to the running k-th
    score: the final k-th score can only be higher, so nothing exact is dropped."""
    keys = group.sorted_keys()
    dev = keys.device
    column = (keys >> (32 + index_bits)) - group.offset
    counts = torch.bincount(column, minlength=group.width)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keys.numel(), device=dev) - starts[column]
    kept = keys[rank < k]
    group.add(kept)
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
