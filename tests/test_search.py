"""Tests for what aoq.search adds over the negatives-specific API (test_mining.py covers
the engine through mine_candidates): SearchOptions, the generic two-direction search,
and that the package sits below every other aoq subpackage.

The reference is brute force: the full float64 score matrix, the band set to -inf, a
stable descending argsort per row / column. Small integer embeddings make every product
exact in fp32 and full of ties, so results are compared with ``==``.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import aoq.search
from aoq.search import SearchOptions, Shard, exact_topk, plan_shards, topk_rows_and_columns
from aoq.search.engine import block_rows_for, tile_plan


def integer_matrices(n_q: int, n_k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(-2, 3, (n_q, d)).astype(np.float32),
            rng.integers(-2, 3, (n_k, d)).astype(np.float32))


def brute_force(q: np.ndarray, k: np.ndarray, k_rows: int, k_columns: int,
                groups: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores (n_q, n_k) float64 with the band at -inf, row ids, column ids)."""
    scores = q.astype(np.float64) @ k.astype(np.float64).T
    if groups is not None:
        qg, kg = groups
        band = (np.arange(len(q))[:, None] // qg) == (np.arange(len(k))[None, :] // kg)
        scores[band] = -np.inf
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k_rows]
    cols = np.argsort(-scores.T, axis=1, kind="stable")[:, :k_columns]
    return scores, rows, cols


# ------------------------------------------------------------------- SearchOptions


def test_default_options_are_valid_and_frozen() -> None:
    options = SearchOptions()
    assert options.col_slice_bits == 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.z = 1.0  # type: ignore[misc]
    # Negative headroom is allowed (it only sends rows to the exact recomputation).
    assert dataclasses.replace(options, z=-8.0).z == -8.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"col_slice": 384}, "col_slice must be a power of two"),
        ({"col_slice": 0}, "col_slice must be >= 1"),
        ({"sort_rows": 0}, "sort_rows must be >= 1"),
        ({"default_block_rows": -1}, "default_block_rows must be >= 1"),
        ({"max_workers": 0}, "max_workers must be >= 1"),
        ({"column_cap_min": -1}, "column_cap_min must be >= 0"),
        ({"column_slack": -0.5}, "column_slack must be finite and >= 0"),
        ({"z": float("nan")}, "z must be finite"),
        ({"bf16_shortlist": 0.5}, "bf16_shortlist must be finite and >= 1"),
        ({"use_workers": 1}, "use_workers must be bool"),
        ({"max_workers": True}, "max_workers must be int"),
        ({"row_sample": 2048.0}, "row_sample must be int"),
        ({"z": "3"}, "z must be float"),
    ],
)
def test_options_are_validated(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SearchOptions(), **change)


def test_options_change_speed_never_results() -> None:
    q, k = integer_matrices(90, 300, 4, seed=3)
    _, rows, cols = brute_force(q, k, 40, 15, (2, 5))
    odd = SearchOptions(order_seed=1, z=0.5, column_slack=0.0, column_cap_min=0,
                        row_sample=16, col_sample=8, sort_rows=8, col_slice=16,
                        use_workers=False)
    (_, r), (_, c) = topk_rows_and_columns(q, k, 40, 15, exclude_groups=(2, 5),
                                           block_rows=20, tile_cols=64, options=odd)
    np.testing.assert_array_equal(r, rows)
    np.testing.assert_array_equal(c, cols)


def test_options_must_be_search_options() -> None:
    q, k = integer_matrices(5, 8, 3, seed=0)
    with pytest.raises(ValueError, match="options must be a SearchOptions"):
        exact_topk(q, k, 2, options={"z": 3.0})  # type: ignore[arg-type]


# ------------------------------------------------------------ two-direction search


@pytest.mark.parametrize(
    ("n_q", "n_k", "d", "k_rows", "k_columns", "groups", "block_rows", "tile_cols"),
    [
        (7, 9, 3, 4, 5, None, None, None),        # tiny, no band
        (40, 60, 3, 57, 38, (2, 3), None, None),  # maximal k in both directions, one tile
        (120, 200, 4, 50, 30, (1, 5), 32, 64),    # the negatives band, sampled thresholds
        (100, 150, 2, 60, 45, (4, 3), 17, 96),    # odd blocks, d=2: ties everywhere
        (64, 130, 5, 0, 20, (3, 2), 8, 64),       # columns only
        (64, 130, 5, 20, 0, None, 8, 64),         # rows only
    ],
)
def test_rows_and_columns_equal_brute_force(n_q, n_k, d, k_rows, k_columns, groups,
                                            block_rows, tile_cols) -> None:
    q, k = integer_matrices(n_q, n_k, d, seed=n_q + n_k)
    scores, rows, cols = brute_force(q, k, k_rows, k_columns, groups)
    stats: dict = {}
    (rv, ri), (cv, ci) = topk_rows_and_columns(
        q, k, k_rows, k_columns, exclude_groups=groups, block_rows=block_rows,
        tile_cols=tile_cols, stats=stats)
    np.testing.assert_array_equal(ri, rows)
    np.testing.assert_array_equal(ci, cols)
    assert ri.dtype == np.int64 and ci.dtype == np.int64
    np.testing.assert_array_equal(rv, np.take_along_axis(scores, rows, 1).astype(np.float32))
    np.testing.assert_array_equal(cv, np.take_along_axis(scores.T, cols, 1).astype(np.float32))
    assert {"row_candidates", "col_candidates", "workers", "seconds_blocks"} <= set(stats)
    # Each direction alone is the same table.
    _, alone = exact_topk(k, q, k_columns, positives=groups and (groups[1], groups[0]),
                          block_rows=block_rows, tile_cols=tile_cols)
    np.testing.assert_array_equal(alone, cols)


def test_ties_fall_back_to_the_lower_index_in_both_directions() -> None:
    rng = np.random.default_rng(5)
    q = np.repeat(rng.integers(-2, 3, (1, 6)), 30, axis=0).astype(np.float32)
    k = rng.integers(-2, 3, (80, 6)).astype(np.float32)
    k[10:60] = k[0]  # equal keys: equal scores against every query
    _, rows, cols = brute_force(q, k, 70, 25, (3, 8))
    (_, ri), (_, ci) = topk_rows_and_columns(q, k, 70, 25, exclude_groups=(3, 8),
                                             block_rows=4, tile_cols=64)
    np.testing.assert_array_equal(ri, rows)
    np.testing.assert_array_equal(ci, cols)


def test_without_scores_and_with_int32_columns() -> None:
    q, k = integer_matrices(30, 50, 4, seed=9)
    _, rows, cols = brute_force(q, k, 10, 6, None)
    (rv, ri), (cv, ci) = topk_rows_and_columns(q, torch.from_numpy(k), 10, 6,
                                               want_scores=False, column_dtype=torch.int32)
    assert rv is None and cv is None
    assert ci.dtype == np.int32
    np.testing.assert_array_equal(ri, rows)
    np.testing.assert_array_equal(ci, cols)


def test_blocks_are_even_over_the_workers_and_tiles_keep_their_stride() -> None:
    options = SearchOptions()
    for n_q, n_k, workers in ((10_000, 50_000, 2), (113_287, 566_435, 2), (5_000, 25_000, 4),
                              (2_049, 10_245, 2), (300, 1_500, 2), (7, 35, 2)):
        rows = block_rows_for(n_q, workers, None, options)
        n_blocks = -(-n_q // rows)
        # Every worker gets as many blocks, and no block is much shorter than the rest.
        assert n_blocks % workers == 0 or n_blocks == 1, (n_q, workers, rows)
        assert rows % 8 == 0 and rows <= options.default_block_rows
        assert n_q - (n_blocks - 1) * rows > rows - 8 * n_blocks, (n_q, workers, rows)
        block, width = tile_plan(n_q, n_k, True, rows, None, options)
        if 2 * block > options.default_block_rows:
            assert width <= options.default_tile_cols, (n_q, workers, width)
    assert block_rows_for(10_000, 2, None, options) == 1_000
    assert block_rows_for(10_000, 2, 512, options) == 512  # the caller's choice stands


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_columns": 29}, "k_columns=29 is larger than the number of queries not excluded "
                            "for some key = 28"),
        ({"k_rows": 48}, "k_rows=48 is larger than the number of keys not excluded"),
        ({"exclude_groups": (2,)}, "exclude_groups must be"),
        ({"exclude_groups": (2, 0)}, r"exclude_groups\[1\] must be >= 1"),
        ({"column_dtype": torch.int16}, "column_dtype must be one of"),
        ({"precision": "fp16"}, "precision must be one of"),
    ],
)
def test_two_direction_validation(kwargs: dict, message: str) -> None:
    q, k = integer_matrices(30, 50, 4, seed=1)
    args = {"k_rows": 5, "k_columns": 5, "exclude_groups": (2, 3), **kwargs}
    with pytest.raises(ValueError, match=message):
        topk_rows_and_columns(q, k, args.pop("k_rows"), args.pop("k_columns"), **args)
    bad = k.copy()
    bad[4, 1] = np.inf
    with pytest.raises(ValueError, match="keys has a non-finite value .*row 4"):
        topk_rows_and_columns(q, bad, 5, 5)


# -------------------------------------------------------------------------- shards


def test_shards_scale_to_a_finer_grid() -> None:
    shard = plan_shards(10, 3)[1]
    assert shard.scaled(5) == (5 * shard.start, 5 * shard.stop)


# -------------------------------------------------------------------------- layering


def test_search_imports_no_other_aoq_subpackage() -> None:
    """aoq.search sits below negatives and evaluation: its modules import only
    aoq.search.*, and only at module level (an import in a function hides a layer)."""
    root = Path(aoq.search.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 5
    wrong: list[str] = []
    for path in files:
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside the package unless it climbs out
                    names = ["aoq.search" if node.level == 1 else "aoq"]
                else:
                    names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] != "aoq":
                    continue
                if name != "aoq.search" and not name.startswith("aoq.search."):
                    wrong.append(f"{path.name}:{node.lineno} imports {name}")
                elif id(node) not in top_level:
                    wrong.append(f"{path.name}:{node.lineno} imports {name} in a function")
    assert wrong == []
