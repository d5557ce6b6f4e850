"""Screenshot a checkpoint's retrieval gallery and its served search page with headless
Chromium (the pictures in docs/inspection.md).

Writes the gallery with ``jobs/gallery.py``, screenshots its retrievals and its first
hard-negative section; starts ``jobs/serve.py`` on a free loopback port, types a query
into the page, screenshots the results, and stops the server with SIGTERM.

    python docs/capture_inspection.py --checkpoint /abs/outputs/<run>/best_model.pt \
        --query "a red dog to the left of a blue car on the grass" --out docs

Needs Debian's ``chromium`` and ``chromium-driver`` and the test extras (selenium).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' Chromium helper

from browser import headless_chromium  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clip_png(driver, css: str, path: Path, height: int | None = None) -> None:
    """Screenshot the page region of the first element matching ``css``."""
    box = driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height];", css)
    x, y, width, full = box
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": x, "y": y, "width": width, "height": height or full, "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"wrote {path}")


def capture_gallery(checkpoint: Path, out: Path, work: Path) -> None:
    page = work / "gallery.html"
    subprocess.run([sys.executable, str(ROOT / "jobs" / "gallery.py"), "--checkpoint",
                    str(checkpoint), "--out", str(page)], check=True)
    with headless_chromium(1280, 1000) as driver:
        driver.get(page.as_uri())
        clip_png(driver, "html", out / "gallery_retrievals.png", height=1250)
        clip_png(driver, "section.anchor", out / "gallery_hard_negatives.png")


def capture_served_page(checkpoint: Path, query: str, out: Path, work: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    with open(work / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"),
                                   "--checkpoint", str(checkpoint), "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(base + "api/health", timeout=10).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not come up; see {work / 'serve.log'}")
                time.sleep(1)
        with headless_chromium(1280, 760) as driver:
            driver.get(base)
            driver.find_element(By.ID, "query").send_keys(query, Keys.ENTER)
            WebDriverWait(driver, 120).until(
                lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "done")
            WebDriverWait(driver, 120).until(lambda d: d.execute_script(
                "return [...document.images].every(i => i.complete)"))
            driver.save_screenshot(str(out / "serve_page.png"))
            print(f"wrote {out / 'serve_page.png'}")
    finally:
        os.kill(server.pid, signal.SIGTERM)
        print(f"server exited with {server.wait(timeout=300)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--query", default="a red dog to the left of a blue car on the grass")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aoq-capture-") as tmp:
        capture_gallery(args.checkpoint.resolve(), args.out, Path(tmp))
        capture_served_page(args.checkpoint.resolve(), args.query, args.out, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
