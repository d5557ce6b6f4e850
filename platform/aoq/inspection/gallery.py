"""A retrieval gallery: one self-contained HTML page showing what a model retrieves.

For sampled test queries it shows the top results, each marked right or wrong (a
caption j belongs to image j // captions_per_image); for sampled training anchors, the
offline hard negatives of the table version in use with the model's scores. Pictures
(:class:`aoq.data.pictures.SplitPictures`) are embedded as data URIs, so the page is one
file that opens anywhere (an MLflow artifact, an e-mail attachment).
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aoq.atomic import atomic_write_text
from aoq.config import Config
from aoq.data.pictures import SplitPictures
from aoq.data.precomp import captions_path, iter_caption_lines
from aoq.data.prepare import PreparedData, SplitArrays, open_split
from aoq.inspection.hard_negatives import AnchorNegatives, TablesInUse, score_anchor, tables_in_use
from aoq.inspection.index import SplitIndex, open_index
from aoq.inspection.pages import templates
from aoq.inspection.query import image_scores, text_scores, top_hits

GALLERY_FILE = "gallery.html"


@dataclass(frozen=True)
class GalleryOptions:
    """How much the gallery shows.

    Attributes:
        queries: sampled test captions (text -> image) and test images (image -> text).
        anchors: sampled training pairs whose offline hard negatives are shown.
        top: results per query and negatives per anchor and table.
        seed: the sampling seed (the same seed shows the same queries).
    """

    queries: int = 6
    anchors: int = 6
    top: int = 5
    seed: int = 0


@dataclass(frozen=True)
class SplitView:
    """What the page shows of a split: its caption texts and its pictures."""

    name: str
    captions: list[str]
    pictures: SplitPictures
    captions_per_image: int

    def picture(self, index: int) -> dict[str, Any]:
        """Template data of image ``index``: a data URI (None: no picture) and a text."""
        return {"index": index, "split": self.name, "uri": _data_uri(self.pictures.png(index)),
                "alt": self.pictures.describe(index)}


def read_captions(directory: str | os.PathLike, split: str) -> list[str]:
    """The caption texts of a precomp split, in file order."""
    return [text for _, text in iter_caption_lines(captions_path(directory, split))]


def split_view(prepared: PreparedData, split: str) -> SplitView:
    info = prepared.splits[split]
    return SplitView(split, read_captions(prepared.directory, split),
                     SplitPictures(prepared.directory, split, info.n_images),
                     prepared.captions_per_image)


def _data_uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def _rank_of(scores: np.ndarray, wanted: np.ndarray) -> int:
    """1-based rank of the best of ``wanted`` items in ``scores`` (descending)."""
    best = scores[wanted].max()
    return int((scores > best).sum()) + 1


def _text_to_image(index: SplitIndex, view: SplitView, caption: int, top: int) -> dict:
    scores = text_scores(index, view.captions[caption])
    truth = caption // view.captions_per_image
    return {"caption": caption, "text": view.captions[caption], "truth": view.picture(truth),
            "rank": _rank_of(scores, np.array([truth])),
            "results": [{"rank": r, "score": hit.score, "right": hit.index == truth,
                         "picture": view.picture(hit.index)}
                        for r, hit in enumerate(top_hits(scores, top), start=1)]}


def _image_to_text(index: SplitIndex, view: SplitView, image: int, top: int) -> dict:
    scores = image_scores(index, image)
    cpi = view.captions_per_image
    return {"picture": view.picture(image),
            "rank": _rank_of(scores, np.arange(image * cpi, (image + 1) * cpi)),
            "results": [{"rank": r, "score": hit.score, "right": hit.index // cpi == image,
                         "caption": hit.index, "text": view.captions[hit.index]}
                        for r, hit in enumerate(top_hits(scores, top), start=1)]}


def _anchor(view: SplitView, scored: AnchorNegatives) -> dict:
    return {"picture": view.picture(scored.image), "caption": scored.caption,
            "text": view.captions[scored.caption], "positive": scored.positive,
            "caption_negatives": [
                {"caption": c, "text": view.captions[c], "score": s,
                 "harder": s > scored.positive} for c, s in scored.caption_negatives],
            "image_negatives": [{"score": s, "harder": s > scored.positive,
                                 "picture": view.picture(i)}
                                for i, s in scored.image_negatives]}


def render_gallery(test: SplitIndex, test_view: SplitView, *, title: str,
                   options: GalleryOptions = GalleryOptions(),
                   train: SplitArrays | None = None, train_view: SplitView | None = None,
                   tables: TablesInUse | None = None, sampling_range: int | None = None
                   ) -> str:
    """The gallery page (HTML text) of ``test``'s model.

    Args:
        test: the index of the split queries are sampled from.
        test_view: that split's captions and pictures.
        train, train_view, tables: the training split, and the tables whose hard
            negatives are shown (None: no hard-negative section).
        sampling_range: h, the candidates training draws from (shown with the tables).
    """
    rng = np.random.default_rng(options.seed)
    n = test.n_images
    captions = rng.choice(test.n_captions, size=min(options.queries, test.n_captions),
                          replace=False)
    images = rng.choice(n, size=min(options.queries, n), replace=False)
    anchors = []
    if tables is not None and train is not None and train_view is not None:
        picked = rng.choice(train.n_images, size=min(options.anchors, train.n_images),
                            replace=False)
        cpi = train.captions_per_image
        anchors = [_anchor(train_view, score_anchor(
            test.model, train, tables.tables, int(i), int(i) * cpi + int(rng.integers(cpi)),
            options.top)) for i in picked]
    return templates().get_template("gallery.html.j2").render(
        title=title, model=test.model_name, checkpoint=test.checkpoint, split=test.split_name,
        created=time.strftime("%Y-%m-%d %H:%M:%S %Z"), top=options.top,
        text_queries=[_text_to_image(test, test_view, int(c), options.top) for c in captions],
        image_queries=[_image_to_text(test, test_view, int(i), options.top) for i in images],
        anchors=anchors, tables=tables, sampling_range=sampling_range,
        image_range=(sampling_range or 0) // test.captions_per_image,
        train_split=train_view.name if train_view else "")


def gallery_for_checkpoint(checkpoint: str | os.PathLike, cfg: Config, prepared: PreparedData,
                           *, run_dir: str | os.PathLike | None = None,
                           tables: TablesInUse | None = None, title: str = "",
                           options: GalleryOptions = GalleryOptions(),
                           progress: bool = False) -> str:
    """The gallery of a checkpoint on ``cfg.data.test_split``, with the hard negatives
    of ``tables`` or, failing that, of the table version ``run_dir`` trained with last.

    Args:
        cfg: the config the model was trained with (data, and the negatives source).
        prepared: ``aoq.data.prepare_data(cfg.data)``.
    """
    test = open_index(checkpoint, prepared, cfg.data.test_split, cfg.data.cache_dir,
                      progress=progress)
    train_name = cfg.data.train_split
    if tables is None and run_dir is not None:
        tables = tables_in_use(cfg, run_dir, n_images=prepared.splits[train_name].n_images,
                               captions_per_image=prepared.captions_per_image)
    train = open_split(prepared, train_name) if tables is not None else None
    dataset = "scenes" if cfg.data.dataset == "scenes" else Path(prepared.directory).name
    return render_gallery(
        test, split_view(prepared, cfg.data.test_split),
        title=title or f"{test.model_name} on {dataset}", options=options,
        train=train, train_view=split_view(prepared, train_name) if train else None,
        tables=tables, sampling_range=cfg.negatives.sampling_range)


def write_gallery(path: str | os.PathLike, html: str) -> Path:
    """Write the page atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)
    return path
