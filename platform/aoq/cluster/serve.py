"""Serve a trained model with Ray Serve: a JSON API and a search page with pictures.

Routes (one FastAPI app, one deployment holding the model and the split's encodings)::

    GET /                       the search page: a text box; results show the pictures
    GET /api/search?q=TEXT&k=K  {"query", "split", "results": [{"image", "score",
                                "caption", "description", "picture"}]}, best first
    GET /api/images/<i>.png     the picture of image i (404 where the dataset has none)
    GET /api/health             {"status": "ok", "model", "split", "images"}

A query longer than ``max_query_chars``, an empty one, one with no known word or a bad
``k`` is answered 400 with ``{"error": ...}``. The proxy binds 127.0.0.1 unless told
otherwise. :func:`serve_until_stopped` runs until SIGINT (Ctrl-C) or SIGTERM, then
removes the application (and stops the local Ray it started) and returns.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import ray
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from aoq.cluster.console import is_verbose
from aoq.cluster.job import connect_ray
from aoq.data.pictures import SplitPictures
from aoq.data.prepare import PreparedData
from aoq.inspection.gallery import read_captions
from aoq.inspection.index import open_index
from aoq.inspection.pages import search_page
from aoq.inspection.query import MAX_QUERY_CHARS, QueryError, search_text

APP_NAME = "aoq"
#: The most results one request may ask for.
MAX_K = 100

app = FastAPI(title="aoq retrieval", docs_url=None, redoc_url=None)


@dataclass(frozen=True)
class ServeSpec:
    """What the deployment serves (plain values: it travels to the replica).

    Attributes:
        checkpoint: the model record file (best_model.pt).
        prepared: the prepared data (``aoq.data.prepare_data``).
        split: the split whose images are searched.
        cache_dir: ``data.cache_dir`` (the split's cached encodings).
        max_query_chars: the longest text query accepted.
        title: the page title.
    """

    checkpoint: str
    prepared: PreparedData
    split: str
    cache_dir: str
    max_query_chars: int = MAX_QUERY_CHARS
    title: str = "aoq retrieval"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(name="QueryService", max_ongoing_requests=8)
@serve.ingress(app)
class QueryService:
    """One replica: the model, the split's encodings, captions and pictures."""

    def __init__(self, spec: ServeSpec) -> None:
        self.spec = spec
        self.index = open_index(spec.checkpoint, spec.prepared, spec.split, spec.cache_dir)
        self.pictures = SplitPictures(spec.prepared.directory, spec.split, self.index.n_images)
        self.captions = read_captions(spec.prepared.directory, spec.split)
        self.page = search_page(title=spec.title, model=self.index.model_name,
                                split=spec.split, n_images=self.index.n_images,
                                max_chars=spec.max_query_chars, max_k=MAX_K)

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return self.page

    @app.get("/api/health")
    def health(self) -> dict:
        return {"status": "ok", "model": self.index.model_name, "split": self.spec.split,
                "images": self.index.n_images}

    @app.get("/api/search")
    def search(self, q: str = "", k: int = 10) -> JSONResponse:
        if not 1 <= k <= MAX_K:
            return _error(400, f"k={k}: must be between 1 and {MAX_K}")
        try:
            hits = search_text(self.index, q, k, max_chars=self.spec.max_query_chars)
        except QueryError as exc:
            return _error(400, str(exc))
        cpi = self.index.captions_per_image
        results = [{"image": h.index, "score": h.score,
                    "caption": self.captions[h.index * cpi],
                    "description": self.pictures.describe(h.index),
                    "picture": None if self.pictures.kind == "none"
                    else f"api/images/{h.index}.png"} for h in hits]
        return JSONResponse({"query": q.strip(), "split": self.spec.split,
                             "results": results})

    @app.get("/api/images/{index}.png")
    def picture(self, index: int) -> Response:
        if not 0 <= index < self.index.n_images:
            return _error(404, f"image {index}: the {self.spec.split} split has images "
                               f"0..{self.index.n_images - 1}")
        png = self.pictures.png(index)
        if png is None:
            return _error(404, f"the dataset has no picture of image {index}")
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})


def _stop_on_signals() -> tuple[threading.Event, Callable[[], None]]:
    """An event set by SIGINT or SIGTERM, and a function that restores the handlers."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return stop, restore


def serve_until_stopped(spec: ServeSpec, *, host: str = "127.0.0.1", port: int = 8000,
                        on_ready: Callable[[str], None] | None = None) -> None:
    """Deploy ``spec`` behind Ray Serve's HTTP proxy on ``host:port`` and block until
    SIGINT or SIGTERM; then delete the application and, if this call started a local
    Ray, stop Serve and Ray. ``on_ready(url)`` is called once requests are answered."""
    started_local = connect_ray()
    # After ray.init, whose core worker installs handlers of its own for these signals.
    stop, restore = _stop_on_signals()
    if not is_verbose():
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": host, "port": port},
                    logging_config={"enable_access_log": is_verbose()})
        serve.run(QueryService.options(ray_actor_options={"num_cpus": 1}).bind(spec),
                  name=APP_NAME, route_prefix="/", blocking=False)
        if on_ready is not None:
            on_ready(f"http://{host}:{port}/")
        while not stop.wait(0.5):
            pass
    finally:
        restore()
        if started_local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)


__all__ = ["APP_NAME", "MAX_K", "QueryService", "ServeSpec", "serve_until_stopped"]
