"""A trained run looked inside, end to end: its gallery is an MLflow artifact, its
warm-up loss is logged apart, its experiment opens on the training runs, and
``jobs/serve.py`` answers over real HTTP, to a headless Chromium too, and stops cleanly
on SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from aoq.cluster.tracking import DEFAULT_UI, EXPERIMENT_KIND, RunHandle, ui_link
from aoq.data.pictures import SplitPictures
from aoq.data.scene_pictures import PICTURE_SIZE
from aoq.data.prepare import prepare_data
from aoq.inspection.gallery import read_captions
from aoq.inspection.index import open_index
from aoq.inspection.query import search_text

from browser import chromium_available, headless_chromium
from conftest import SmallRun, driver_env, train_small

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, scenes_cache: Path, local_ray) -> SmallRun:
    """Mines its tables after a warm-up epoch (max-violation warm-up too), then AOQ."""
    return train_small(tmp_path_factory.mktemp("inspect"), scenes_cache, "loss.variant=aoq",
                       "negatives.source=mine", "negatives.warmup_epochs=1",
                       "negatives.pool_actors=0", "optim.epochs=2", "run.name=inspect")


def test_the_run_logs_its_gallery_with_the_tables_it_used(run: SmallRun, tmp_path: Path) -> None:
    assert "gallery.html" in {a.path for a in run.client.list_artifacts(run.outcome.run_id)}
    html = Path(run.client.download_artifacts(run.outcome.run_id, "gallery.html",
                                              str(tmp_path))).read_text()
    assert html == (run.output_dir / "gallery.html").read_text()
    # The last epoch trained with version 1 (mined after the warm-up epoch).
    assert "Table version 1 (the version its last epoch trained with" in html
    assert html.count('class="query anchor"') == 6
    assert html.count('class="query text-query"') == 6
    sources = [part.split('"', 1)[0] for part in html.split('src="data:image/png;base64,')[1:]]
    assert len(sources) >= 72  # 6 text queries x 5, 6 image queries, 6 anchors x 6
    for source in sources:
        Image.open(io.BytesIO(base64.b64decode(source))).verify()


def test_the_warm_up_loss_is_logged_apart(run: SmallRun) -> None:
    warm = run.history("warmup/loss")
    assert [step for step, _ in warm] == [0]
    train = dict(run.history("train/loss"))
    assert sorted(train) == [0, 1]
    # Charted on the scale of the epochs after it, not two orders of magnitude above.
    assert train[0] < warm[0][1]
    assert [s for s, _ in run.history("warmup/online_image_anchor")] == [0]


def test_the_experiment_is_marked_and_the_run_s_link_opens_its_training_view(
        run: SmallRun) -> None:
    experiment = run.client.get_experiment_by_name(run.cfg.tracking.experiment)
    for key, value in EXPERIMENT_KIND.items():
        assert experiment.tags[key] == value
    # MLflow 3.17's UI shows the GenAI overview unless the link asks for model training
    # (checked by hand in headless Chromium: docs/inspection.md).
    local = RunHandle(f"sqlite:///{run.tmp / 'mlflow.db'}", run.outcome.run_id,
                      experiment.experiment_id)
    assert ui_link(local) == (f"{DEFAULT_UI}/#/experiments/{experiment.experiment_id}/runs/"
                              f"{run.outcome.run_id}?workflowType=machine_learning")
    server = RunHandle("http://10.0.0.10:5000/", "abc", "7")
    assert ui_link(server) == ("http://10.0.0.10:5000/#/experiments/7/runs/abc"
                               "?workflowType=machine_learning")


# ------------------------------------------------------------------ serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    base: str
    log: Path

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def search(self, q: str, k: int = 10) -> tuple[int, dict]:
        status, body = self.get("api/search?" + urllib.parse.urlencode({"q": q, "k": k}))
        return status, json.loads(body)


def wait_until_answers(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600  # a hang guard, not a timing assertion
    while True:
        assert process.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{url} never answered"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(run: SmallRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``jobs/serve.py`` on the run's best model, in its own process (and its own Ray)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "serve.py"), "--checkpoint",
             str(run.output_dir / "best_model.pt"), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=driver_env(), cwd=log.parent)
    server = Server(process, f"http://127.0.0.1:{port}/", log)
    try:
        wait_until_answers(server.base + "api/health", process, log)
        yield server
    finally:
        if process.poll() is None:  # a failed test left it running: stop what we started
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_the_served_api_answers_over_http(run: SmallRun, server: Server) -> None:
    prepared = prepare_data(run.cfg.data, progress=False)
    captions = read_captions(prepared.directory, "test")
    status, health = server.get("api/health")
    assert status == 200 and json.loads(health)["images"] == 100
    status, body = server.search(captions[35], k=5)
    assert status == 200 and body["query"] == captions[35] and len(body["results"]) == 5
    # The same answer as the model queried here, in this process.
    index = open_index(run.output_dir / "best_model.pt", prepared, "test",
                       run.cfg.data.cache_dir)
    expected = search_text(index, captions[35], 5)
    assert [r["image"] for r in body["results"]] == [h.index for h in expected]
    assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in expected],
                                                                  abs=1e-6)
    first = body["results"][0]
    assert first["caption"] == captions[5 * first["image"]]
    status, png = server.get(first["picture"])
    assert status == 200 and png == SplitPictures(prepared.directory, "test", 100).png(
        first["image"])
    status, page = server.get("")
    assert status == 200 and b'id="query"' in page
    # Bad queries: a clear error, never a crash of the server.
    for q, k, message in (("dog " * 200, 5, "at most 500 are accepted"),
                          ("", 5, "the query text is empty"),
                          ("qwerty zxcv", 5, "none of the words"),
                          ("a red dog", 0, "k=0: must be between 1 and 100")):
        status, error = server.search(q, k)
        assert status == 400 and message in error["error"]
    status, missing = server.get("api/images/100.png")
    assert status == 404 and "0..99" in json.loads(missing)["error"]


def test_the_served_page_in_headless_chromium(run: SmallRun, server: Server) -> None:
    assert chromium_available(), ("the served-page test needs Debian's chromium and "
                                  "chromium-driver (.ci/run installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    prepared = prepare_data(run.cfg.data, progress=False)
    query = read_captions(prepared.directory, "test")[12]
    with headless_chromium() as browser:
        browser.get(server.base)
        browser.find_element(By.ID, "query").send_keys(query, Keys.ENTER)
        WebDriverWait(browser, 120).until(  # a hang guard
            lambda b: b.find_element(By.ID, "status").get_attribute("data-state") == "done")
        cards = browser.find_elements(By.CSS_SELECTOR, "figure.result")
        shown = [int(c.get_attribute("data-image")) for c in cards]
        pictures = "return [...document.querySelectorAll('figure.result img')]"
        WebDriverWait(browser, 120).until(  # every picture arrives (or fails) in time
            lambda b: all(b.execute_script(pictures + ".map(i => i.complete)")))
        sizes = browser.execute_script(pictures + ".map(i => [i.naturalWidth, i.naturalHeight])")
        status_text = browser.find_element(By.ID, "status").text
    _, body = server.search(query, k=10)
    assert shown == [r["image"] for r in body["results"]] and len(shown) == 10
    assert sizes == [list(PICTURE_SIZE)] * 10  # every picture arrived and decoded
    assert status_text.startswith("10 images for")


def test_the_server_stops_cleanly_on_sigterm(server: Server) -> None:
    os.kill(server.process.pid, signal.SIGTERM)
    assert server.process.wait(timeout=300) == 0  # a hang guard
    out = server.log.read_text()
    assert "[aoq] serving" in out and out.rstrip().endswith("[aoq] stopped")
    # Ray's own chatter stays off the default console.
    for noise in ("core_worker.cc", "SIGTERM received", "Traceback", "WARNING"):
        assert noise not in out, noise
    with pytest.raises(OSError):
        server.get("api/health")
