"""Plots of evaluation results, written as PNG files.

matplotlib is imported inside the functions (importing ``aoq.evaluation`` must stay cheap
and free of side effects).  Figures are drawn with the object-oriented API on their own
Agg canvas, never through pyplot: that needs no display, leaves the caller's global
backend and pyplot figure list alone (a notebook user's ``%matplotlib`` setting survives),
and is safe from worker threads.  Each PNG is written to a temporary file in the target
directory and moved into place (``aoq.atomic``), so a reader (MLflow, a browser, a
crashed job's successor) never sees a half-written image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aoq.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_histograms", "plot_recall_curves"]


def _new_figure() -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig: rendering never touches pyplot
    return fig, fig.add_subplot()


def _save_png_atomic(fig: Figure, path: str | os.PathLike[str]) -> None:
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"directory of {str(target)!r} does not exist")
    atomic_write(target, lambda fh: fig.savefig(fh, format="png"))


def _check_named_arrays(values: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    if not values:
        raise ValueError(f"{what} is empty: nothing to plot")
    out: dict[str, np.ndarray] = {}
    for name, value in values.items():
        array = np.asarray(value, dtype=np.float64)
        if array.ndim != 1 or array.size == 0:
            raise ValueError(f"{what}[{name!r}] must be a non-empty 1-D array, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"{what}[{name!r}] holds non-finite values")
        out[str(name)] = array
    return out


def plot_recall_curves(curves: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
    """Plot Recall@K against K (log x axis) for named curves and write a PNG.

    Args:
        curves: name -> recall in percent, shape ``(max_k,)``, entry ``K - 1`` being R@K
            (as returned by :func:`aoq.evaluation.recall_curve`), e.g. ``{"i2t": ...,
            "t2i": ...}``. Curves may have different lengths.
        path: output PNG path; its directory must exist. Replaced atomically.

    Raises:
        ValueError: no curves, or a curve that is not a non-empty finite 1-D array.
        FileNotFoundError: the directory of ``path`` does not exist.
    """
    data = _check_named_arrays(curves, "curves")
    fig, ax = _new_figure()
    for name, recall in data.items():
        ks = np.arange(1, recall.size + 1)
        ax.plot(ks, recall, label=name, marker="." if recall.size <= 20 else None)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0.0, 100.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save_png_atomic(fig, path)


def plot_histograms(
    samples: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    xlabel: str,
    title: str,
    *,
    bins: int = 50,
    density: bool = True,
) -> None:
    """Overlaid histograms of named samples (e.g. negative-hardness scores) as a PNG.

    Args:
        samples: name -> 1-D array of values, shape ``(n_name,)``; sizes may differ.
        path: output PNG path; its directory must exist. Replaced atomically.
        xlabel: x-axis label.
        title: figure title.
        bins: number of bins, shared by all samples (same edges, so bars compare).
        density: normalise each histogram to unit area, so samples of different sizes
            compare by shape; ``False`` plots raw counts.

    Raises:
        ValueError: no samples, an empty or non-finite sample, or ``bins < 1``.
        FileNotFoundError: the directory of ``path`` does not exist.
    """
    data = _check_named_arrays(samples, "samples")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    edges = np.histogram_bin_edges(np.concatenate(list(data.values())), bins=int(bins))
    fig, ax = _new_figure()
    for name, values in data.items():
        ax.hist(values, bins=edges, density=density, alpha=0.45, label=name, histtype="stepfilled")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "count")
    ax.set_title(title)
    ax.legend()
    _save_png_atomic(fig, path)
