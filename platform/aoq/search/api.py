"""Public entry points: checks, device and precision, then the engine.

Scores are fp32 inner products (``queries @ keys.T``). Every output row is sorted by
descending score, equal scores by ascending index, so results are a pure function of the
inputs and equal a brute-force stable sort of the full score matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from aoq.search.bf16 import bf16_topk
from aoq.search.checks import as_matrix, check_int, max_excluded, to_numpy
from aoq.search.checks import check_finite as require_finite  # a parameter takes the name
from aoq.search.engine import Result, blocked_topk
from aoq.search.options import SearchOptions

__all__ = ["exact_topk", "overlap_at_k", "topk_rows_and_columns"]

PRECISIONS = ("fp32", "tf32", "bf16")
_COLUMN_DTYPES = (torch.int64, torch.int32)


def exact_topk(
    queries: Any,
    keys: Any,
    k: int,
    *,
    positives: tuple[int, int] | None = None,
    block_rows: int | None = None,
    tile_cols: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | str = False,
    precision: str = "fp32",
    stats: dict[str, Any] | None = None,
    options: SearchOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k keys per query by inner product, with an optional excluded band.

    ``exact_topk(images, captions, K, positives=(1, 5))`` is a row table that leaves out
    each image's 5 own captions; :func:`topk_rows_and_columns` computes both directions
    from a single pass of products.

    Args:
        queries: (n_queries, d) float array or tensor (numpy or torch; float16, bfloat16
            and float64 are converted to float32).
        keys: (n_keys, d) float array or tensor.
        k: results per query, 0 <= k <= n_keys - (most keys excluded for one query).
        positives: ``(query_group, key_group)``: query q and key j are excluded from
            each other when ``q // query_group == j // key_group``. None excludes nothing.
        block_rows: queries per block (default ``options.default_block_rows``); memory
            grows linearly with it.
        tile_cols: keys per tile (default ``options.default_tile_cols``, rounded to a
            multiple of 64); a tile of block_rows x tile_cols fp32 scores should fit in
            the last-level cache.
        device: where to compute; default CUDA when available, else CPU.
        progress: show a tqdm bar over row blocks (a string: with that label).
        precision: "fp32" (exact), "tf32" (fp32 inputs, products on TF32 tensor cores
            where CUDA has them: not exact, the scores carry ~1e-3 relative error) or
            "bf16" (a bf16 shortlist rescored in fp32, not guaranteed exact; see
            :mod:`aoq.search.bf16`). Measure the approximate modes against "fp32" with
            :func:`overlap_at_k`.
        stats: if given, filled with counters (candidates, recomputed rows, ...), the
            tile plan and seconds per phase.
        options: tuning (:class:`SearchOptions`); None is the defaults.

    Returns:
        ``(scores, indices)``: (n_queries, k) float32 and int64, each row by descending
        score, equal scores by ascending key index. In bf16 mode the scores are the
        fp32 rescores of the shortlist.

    Raises:
        ValueError: on inconsistent shapes, k out of range, non-float or non-finite
            inputs, a malformed band, or an unknown precision.
    """
    q, kk = _pair(queries, keys)
    groups = _band("positives", positives)
    excluded = max_excluded(q.shape[0], kk.shape[0], *groups) if groups else 0
    k = check_int("k", k, minimum=0, maximum=kk.shape[0] - excluded,
                  why="the number of keys not excluded for some query")
    require_finite("queries", q)
    require_finite("keys", kk)
    rows, _ = _search(q, kk, k, 0, groups, block_rows=block_rows, tile_cols=tile_cols,
                      device=device, progress=progress, precision=precision, stats=stats,
                      options=options)
    return rows[0].numpy(), rows[1].numpy()


def topk_rows_and_columns(
    queries: Any,
    keys: Any,
    k_rows: int,
    k_columns: int,
    *,
    exclude_groups: tuple[int, int] | None = None,
    block_rows: int | None = None,
    tile_cols: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | str = False,
    precision: str = "fp32",
    stats: dict[str, Any] | None = None,
    want_scores: bool = True,
    column_dtype: torch.dtype = torch.int64,
    check_finite: bool = True,
    options: SearchOptions | None = None,
) -> tuple[tuple[np.ndarray | None, np.ndarray], tuple[np.ndarray | None, np.ndarray]]:
    """Row top-k and column top-k of ``queries @ keys.T`` from ONE pass of products.

    Row i holds the k_rows best keys of query i, column j the k_columns best queries of
    key j, both with the same band excluded and the same order as :func:`exact_topk`
    (whose ``exact_topk(keys, queries, ...)`` computes the column table alone).

    Args:
        queries: (n_queries, d) float array or tensor.
        keys: (n_keys, d) float array or tensor.
        k_rows: 0 <= k_rows <= n_keys - (most keys excluded for one query).
        k_columns: 0 <= k_columns <= n_queries - (most queries excluded for one key).
        exclude_groups: ``(query_group, key_group)``, as ``positives`` of
            :func:`exact_topk`.
        block_rows, tile_cols, device, progress, precision, stats, options: as in
            :func:`exact_topk`.
        want_scores: False returns None for the scores (and saves their memory).
        column_dtype: torch.int64 or torch.int32, the dtype of the column table.
        check_finite: False skips the scan for NaN / inf (for callers that did it);
            non-finite inputs then give undefined results.

    Returns:
        ``((row_scores, row_ids), (column_scores, column_ids))``: (n_queries, k_rows)
        float32 and int64, (n_keys, k_columns) float32 and ``column_dtype``; scores are
        None unless ``want_scores``.

    Raises:
        ValueError: as :func:`exact_topk`, and on an unsupported ``column_dtype``.
    """
    q, kk = _pair(queries, keys)
    groups = _band("exclude_groups", exclude_groups)
    n_q, n_k = q.shape[0], kk.shape[0]
    excluded_keys = max_excluded(n_q, n_k, groups[0], groups[1]) if groups else 0
    excluded_queries = max_excluded(n_k, n_q, groups[1], groups[0]) if groups else 0
    k_rows = check_int("k_rows", k_rows, minimum=0, maximum=n_k - excluded_keys,
                       why="the number of keys not excluded for some query")
    k_columns = check_int("k_columns", k_columns, minimum=0, maximum=n_q - excluded_queries,
                          why="the number of queries not excluded for some key")
    if column_dtype not in _COLUMN_DTYPES:
        raise ValueError(f"column_dtype must be one of {_COLUMN_DTYPES}, got {column_dtype!r}")
    if check_finite:
        require_finite("queries", q)
        require_finite("keys", kk)
    rows, cols = _search(q, kk, k_rows, k_columns, groups, block_rows=block_rows,
                         tile_cols=tile_cols, device=device, progress=progress,
                         precision=precision, stats=stats, options=options,
                         want_values=want_scores, col_dtype=column_dtype)
    return _to_numpy_pair(rows, want_scores), _to_numpy_pair(cols, want_scores)


def overlap_at_k(a: Any, b: Any) -> float:
    """Mean over rows of |set(a[i]) & set(b[i])| / k for two (n, k) index tables.

    1.0 means every row holds the same ids (in any order). Used to report how close the
    bf16 mode (or any approximate table) is to the exact one.
    """
    ta = torch.from_numpy(np.ascontiguousarray(to_numpy(a), dtype=np.int64))
    tb = torch.from_numpy(np.ascontiguousarray(to_numpy(b), dtype=np.int64))
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


# -------------------------------------------------------------------------- helpers

def _pair(queries: Any, keys: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as float32 matrices (n_queries, d) and (n_keys, d) of one d."""
    q = as_matrix("queries", queries)
    kk = as_matrix("keys", keys)
    if q.shape[1] != kk.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but keys have {kk.shape[1]}")
    return q, kk


def _band(name: str, groups: tuple[int, int] | None) -> tuple[int, int] | None:
    """A checked ``(query_group, key_group)`` exclusion band, or None."""
    if groups is None:
        return None
    if len(groups) != 2:
        raise ValueError(f"{name} must be (query_group, key_group), got {groups!r}")
    return (check_int(f"{name}[0]", groups[0], minimum=1),
            check_int(f"{name}[1]", groups[1], minimum=1))


def _to_numpy_pair(pair: tuple[torch.Tensor | None, torch.Tensor], want_scores: bool
                   ) -> tuple[np.ndarray | None, np.ndarray]:
    values, ids = pair
    return (values.numpy() if want_scores and values is not None else None), ids.numpy()


def _search(q: torch.Tensor, kk: torch.Tensor, k_row: int, k_col: int,
            groups: tuple[int, int] | None, *, block_rows: int | None,
            tile_cols: int | None, device: str | torch.device | None,
            progress: bool | str, precision: str, stats: dict[str, Any] | None,
            options: SearchOptions | None, want_values: bool = True,
            col_dtype: torch.dtype = torch.int64) -> Result:
    """Checked inputs -> the engine in the asked precision, on the asked device, with
    fp32 products really fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if block_rows is not None:
        check_int("block_rows", block_rows, minimum=1)
    if tile_cols is not None:
        check_int("tile_cols", tile_cols, minimum=1)
    if options is None:
        options = SearchOptions()
    elif not isinstance(options, SearchOptions):
        raise ValueError(f"options must be a SearchOptions, got {type(options).__name__}")
    dev = _resolve_device(device)
    if stats is None:
        stats = {}
    plan = dict(block_rows=block_rows, tile_cols=tile_cols, progress=progress, stats=stats,
                options=options, col_dtype=col_dtype)
    with torch.no_grad(), _matmul_precision(dev, "high" if precision == "tf32" else "highest"):
        q = q.to(dev, torch.float32)
        kk = kk.to(dev, torch.float32)
        if precision == "bf16":
            return bf16_topk(q, kk, k_row, k_col, groups, **plan)
        return blocked_topk(q, kk, k_row, k_col, groups, score_dtype=torch.float32,
                            want_values=want_values, **plan)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def _matmul_precision(device: torch.device, level: str) -> Iterator[None]:
    """fp32 products at ``level`` ("highest": really fp32, whatever TF32 / bf16
    shortcuts a caller switched on; "high": TF32 allowed), restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    cuda = device.type == "cuda"
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    try:
        if previous != level:
            torch.set_float32_matmul_precision(level)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = level != "highest"
        yield
    finally:
        if previous != level:
            torch.set_float32_matmul_precision(previous)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
