"""Looking inside a model, without Ray: scene records and pictures, the cached split
index, the query CLI (it agrees with jobs/evaluate.py's score matrix), bad queries, and
the gallery page (it parses, and every picture it shows is the split's own)."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from aoq.cli import run_cli
from aoq.config import load_config
from aoq.data import DataError
from aoq.data.pictures import SplitPictures, picture_file, read_scene_records, scene_records_path
from aoq.data.precomp import write_precomp
from aoq.data.prepare import open_split, prepare_data
from aoq.data.scene_pictures import PICTURE_SIZE, scene_png
from aoq.data.scenes import OBJECTS
from aoq.inspection.gallery import GalleryOptions, gallery_for_checkpoint, read_captions
from aoq.inspection.hard_negatives import TablesInUse
from aoq.inspection.index import index_key, open_index
from aoq.inspection.query import QueryError, search_text
from aoq.models import build_model
from aoq.models.encode import encode_split
from aoq.models.files import load_model, model_record, save_file
from aoq.negatives.from_model import mine_from_model
from aoq.negatives.tables import load_tables, save_tables

from conftest import SMALL_SCENES

ROOT = Path(__file__).resolve().parents[1]


def job(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(scenes_cache: Path):
    cfg = load_config(None, [*SMALL_SCENES, f"data.cache_dir={scenes_cache}"])
    return cfg, prepare_data(cfg.data, progress=False)


def save_model(cfg, prepared, name: str, path: Path, seed: int = 0) -> Path:
    """A randomly initialised model of ``name``, saved as a model record."""
    torch.manual_seed(seed)
    model_cfg = dataclasses.replace(cfg.model, name=name)
    model = build_model(model_cfg, prepared.vocab_size, prepared.feature_dim)
    save_file(path, model_record(model_cfg, model, vocab_size=prepared.vocab_size,
                                 img_dim=prepared.feature_dim, vocab_path=prepared.vocab_path,
                                 epoch=0, dev_rsum=0.0))
    return path


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A global-embedding model and a cross-attention one."""
    cfg, prepared = data
    tmp = tmp_path_factory.mktemp("checkpoints")
    return {name: save_model(cfg, prepared, name, tmp / f"{name}.pt", seed)
            for seed, name in enumerate(("vse", "scan"))}


# ------------------------------------------------------------------ scenes records, pictures


def test_scenes_record_what_each_image_shows(data) -> None:
    cfg, prepared = data
    for split, info in prepared.splits.items():
        records = read_scene_records(scene_records_path(prepared.directory, split),
                                     info.n_images)
        captions = read_captions(prepared.directory, split)
        for i, record in enumerate(records[:40]):
            first = captions[5 * i]
            for obj in record["objects"]:
                # Every caption names both objects (or a synonym) with their colours.
                assert obj["colour"] in first.split()
                assert set(OBJECTS[obj["object"]]) & set(re.findall(r"\w+", first)), first
            assert record["background"] in {"grass", "street", "beach", "room", "snow",
                                            "field"}


def test_scene_pictures_are_drawn_deterministically(data) -> None:
    _, prepared = data
    pictures = SplitPictures(prepared.directory, "test", prepared.splits["test"].n_images)
    assert pictures.kind == "scenes"
    first, again, other = pictures.png(0), pictures.png(0), pictures.png(1)
    assert first == again and first != other
    image = Image.open(io.BytesIO(first))
    assert image.size == PICTURE_SIZE and image.mode == "RGB"
    with pytest.raises(IndexError, match="out of range"):
        pictures.png(prepared.splits["test"].n_images)
    # Unknown names are drawn in grey rather than refused.
    assert scene_png({"background": "moon", "objects": [{"object": "robot", "x": 0.5,
                                                         "y": 0.5}]})


def test_bad_scene_records_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "test_scenes.jsonl"
    path.write_text('{"background": "grass", "objects": []}\nnot json\n')
    with pytest.raises(DataError, match=r"test_scenes\.jsonl, line 2: not a JSON scene record"):
        read_scene_records(path, 2)
    path.write_text('{"background": "grass", "objects": []}\n')
    with pytest.raises(DataError, match="1 scene records for 3 images"):
        read_scene_records(path, 3)


def write_rendered_dataset(directory: Path) -> Path:
    """A tiny precomp dataset that keeps rendered images, as the emoji builder writes
    them: ``<split>_images/<index:05d>.png``."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "cat", "dog", "fish", "left", "right", "of", "a"]
    for split, n in (("train", 30), ("dev", 10), ("test", 12)):
        captions = [" ".join(rng.choice(words, size=6)) for _ in range(5 * n)]
        write_precomp(directory, split, rng.standard_normal((n, 4, 8)).astype(np.float32),
                      captions)
        (directory / f"{split}_images").mkdir()
        for i in range(n):
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            Image.new("RGB", (24, 24), colour).save(picture_file(directory, split, i))
    return directory


# ------------------------------------------------------------------ the split index


def test_the_index_is_cached_by_checkpoint_and_split(data, checkpoints, tmp_path: Path) -> None:
    cfg, prepared = data
    path = tmp_path / "vse.pt"
    path.write_bytes(checkpoints["vse"].read_bytes())
    first = open_index(path, prepared, "test", tmp_path / "cache")
    entry = tmp_path / "cache" / "index" / index_key(path, prepared, "test")
    assert first.images.shape == (100, cfg.model.embed_dim)
    assert first.captions.shape == (500, cfg.model.embed_dim)
    # The second open reads the cache back: prove it by planting other numbers there.
    np.save(entry / "images.npy", np.zeros((100, cfg.model.embed_dim), dtype=np.float32))
    assert float(open_index(path, prepared, "test", tmp_path / "cache").images.abs().sum()) == 0
    # Another split, or a rewritten checkpoint, is another entry (encoded afresh).
    assert index_key(path, prepared, "dev") != index_key(path, prepared, "test")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = open_index(path, prepared, "test", tmp_path / "cache")
    torch.testing.assert_close(again.images, first.images, rtol=0, atol=0)


def test_mining_shows_progress_while_it_encodes(data, capsys) -> None:
    cfg, prepared = data
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim)
    train = open_split(prepared, "train")
    mine_from_model(model, train, k_captions=10, k_images=5, progress=True)  # jobs/mine.py
    err = capsys.readouterr().err
    assert "encoding images" in err and "encoding captions" in err and "240/240" in err
    encode_split(model, train)  # silent unless asked
    assert "encoding" not in capsys.readouterr().err


# ------------------------------------------------------------------ the query CLI


@pytest.mark.parametrize("name", ["vse", "scan"])
def test_query_cli_agrees_with_the_evaluate_score_matrix(data, checkpoints, scenes_cache: Path,
                                                         tmp_path: Path, capsys,
                                                         name: str) -> None:
    cfg, prepared = data
    data_args = [*SMALL_SCENES, f"data.cache_dir={scenes_cache}"]
    checkpoint = str(checkpoints[name])
    assert job("evaluate").main([*data_args, "--checkpoint", checkpoint,
                                 "--scores-out", str(tmp_path / "scores.npy")]) == 0
    matrix = np.load(tmp_path / "scores.npy")  # (100 images, 500 captions)
    captions = read_captions(prepared.directory, "test")
    capsys.readouterr()
    query = job("query")

    def ask(*args: str) -> list[dict]:
        assert query.main([*data_args, "--checkpoint", checkpoint, "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)["results"]

    for caption in (0, 7, 333):  # text -> image: a column of the matrix
        results = ask("--text", captions[caption], "--k", "1000")
        assert [r["score"] for r in results] == sorted((r["score"] for r in results),
                                                       reverse=True)
        scores = np.array([r["score"] for r in sorted(results, key=lambda r: r["image"])])
        np.testing.assert_allclose(scores, matrix[:, caption], rtol=0, atol=1e-5)
    for image in (0, 42, 99):  # image -> text: a row of the matrix
        results = ask("--image", str(image), "--k", "5000")
        scores = np.array([r["score"] for r in sorted(results, key=lambda r: r["caption"])])
        np.testing.assert_allclose(scores, matrix[image], rtol=0, atol=1e-5)
        assert [r["score"] for r in results] == sorted((r["score"] for r in results),
                                                       reverse=True)
    top = ask("--image", "42", "--k", "3")
    assert len(top) == 3 and set(top[0]) == {"caption", "score"}


def test_query_cli_prints_results_with_their_texts(data, checkpoints, scenes_cache: Path,
                                                   capsys) -> None:
    _, prepared = data
    captions = read_captions(prepared.directory, "test")
    args = [*SMALL_SCENES, f"data.cache_dir={scenes_cache}", "--checkpoint",
            str(checkpoints["vse"])]
    assert job("query").main([*args, "--text", captions[10], "--k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("top 3 test images for") and len(lines) == 4
    image = int(re.search(r"image (\d+)", lines[1]).group(1))
    assert lines[1].endswith(captions[5 * image])
    assert job("query").main([*args, "--image", "2", "--k", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("top 2 captions for test image 2") and len(out) == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--text", "   "], "error: the query text is empty"),
    (["--text", "xyzzy plugh"], "error: none of the words of 'xyzzy plugh' is in the model's "
                                "vocabulary"),
    (["--image", "100"], "error: image 100 is out of range: the test split has images 0..99"),
    (["--image", "-1"], "error: image -1 is out of range"),
    (["--text", "a dog", "--k", "0"], "error: --k 0: ask for at least one result"),
])
def test_bad_queries_get_one_clear_error_line(data, checkpoints, scenes_cache: Path, capsys,
                                              args: list[str], message: str) -> None:
    argv = [*SMALL_SCENES, f"data.cache_dir={scenes_cache}", "--checkpoint",
            str(checkpoints["scan"]), *args]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(job("query").main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message) and "Traceback" not in "\n".join(err)


def test_a_query_longer_than_the_bound_is_refused(data, checkpoints, tmp_path: Path) -> None:
    _, prepared = data
    index = open_index(checkpoints["vse"], prepared, "test", tmp_path)
    with pytest.raises(QueryError, match="at most 20 are accepted"):
        search_text(index, "a red dog " * 5, max_chars=20)


# ------------------------------------------------------------------ the gallery page


class PageParser(HTMLParser):
    """Every picture of a page with the section and figure it sits in, and every caption
    list item with its section."""

    def __init__(self) -> None:
        super().__init__()
        self.section: dict[str, str] = {}
        self.figure = ""
        self.pictures: list[dict] = []
        self.items: list[dict] = []
        self.sections: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.section = attrs
            self.sections.append(attrs)
        elif tag == "figure":
            self.figure = attrs.get("class", "")
        elif (tag == "img" or "nopic" in attrs.get("class", "")) and "data-index" in attrs:
            self.pictures.append({**attrs, "tag": tag, "figure": self.figure,
                                  "section": self.section})
        elif tag == "li":
            self.items.append({**attrs, "section": self.section})


def parse_page(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    parser.close()
    return parser


def picture_bytes(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return base64.b64decode(src[len(prefix):], validate=True)


def test_gallery_shows_retrievals_and_hard_negatives_with_real_pictures(
        data, checkpoints, tmp_path: Path) -> None:
    cfg, prepared = data
    model, _ = load_model(checkpoints["vse"])
    i2t, t2i = mine_from_model(model, open_split(prepared, "train"), k_captions=20, k_images=8)
    tables = load_tables(save_tables(tmp_path / "tables", 1, i2t, t2i, source="test"))
    html = gallery_for_checkpoint(checkpoints["vse"], cfg, prepared,
                                  tables=TablesInUse(tables, "given"),
                                  options=GalleryOptions(queries=4, anchors=3, top=5))
    page = parse_page(html)
    kinds = [s.get("class", "") for s in page.sections]
    assert kinds.count("query text-query") == 4 and kinds.count("query image-query") == 4
    assert kinds.count("query anchor") == 3
    pictures = {split: SplitPictures(prepared.directory, split, info.n_images)
                for split, info in prepared.splits.items()}
    for picture in page.pictures:  # every picture shown is the split's own
        png = picture_bytes(picture["src"])
        assert png == pictures[picture["data-split"]].png(int(picture["data-index"]))
        Image.open(io.BytesIO(png)).verify()
    for picture in page.pictures:  # right or wrong, as the ground truth says
        section, figure = picture["section"], picture["figure"]
        if "text-query" in section.get("class", "") and figure in ("right", "wrong"):
            truth = int(section["data-caption"]) // 5
            assert (figure == "right") == (int(picture["data-index"]) == truth)
    for item in page.items:
        if "image-query" in item["section"].get("class", ""):
            own = int(item["data-caption"]) // 5 == int(item["section"]["data-image"])
            assert item["class"] == ("right" if own else "wrong")
    anchors = [s for s in page.sections if s.get("class") == "query anchor"]
    for anchor in anchors:
        caption = int(anchor["data-caption"])
        listed = [int(i["data-caption"]) for i in page.items if i["section"] is anchor]
        assert listed == [int(c) for c in tables.i2t[caption // 5, :5]]
        shown = [int(p["data-index"]) for p in page.pictures
                 if p["section"] is anchor and p["figure"] == "wrong"]
        assert shown == [int(i) for i in tables.t2i[caption, :5]]
    assert "Table version 1" in html


def test_gallery_uses_a_dataset_s_rendered_images(tmp_path: Path) -> None:
    directory = write_rendered_dataset(tmp_path / "rendered")
    cfg = load_config(None, [f"data.dataset={directory}", f"data.cache_dir={tmp_path / 'c'}",
                             "data.min_word_count=1", "model.embed_dim=16",
                             "model.word_dim=8"])
    prepared = prepare_data(cfg.data, progress=False)
    checkpoint = save_model(cfg, prepared, "vse", tmp_path / "vse.pt")
    page = parse_page(gallery_for_checkpoint(checkpoint, cfg, prepared,
                                             options=GalleryOptions(queries=3)))
    assert page.pictures and all(p["tag"] == "img" for p in page.pictures)
    for picture in page.pictures:
        assert picture_bytes(picture["src"]) == picture_file(
            directory, picture["data-split"], int(picture["data-index"])).read_bytes()
    # A picture missing from the folder, or a dataset without pictures: the index shows.
    picture_file(directory, "test", 3).unlink()
    assert SplitPictures(directory, "test", 12).png(3) is None
    for split in ("train", "dev", "test"):
        for png in (directory / f"{split}_images").iterdir():
            png.unlink()
        (directory / f"{split}_images").rmdir()
    bare = parse_page(gallery_for_checkpoint(checkpoint, cfg, prepared,
                                             options=GalleryOptions(queries=2)))
    assert bare.pictures and all(p["tag"] == "div" for p in bare.pictures)
