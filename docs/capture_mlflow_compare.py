"""Screenshot the MLflow compare page of a study's trials with headless Chromium.

Starts ``mlflow server`` on loopback over the given store, finds the study's child runs
(tag ``study=<name>``, nested under its parent run), opens the compare view of those
runs in Debian's ``chromium --headless`` and writes a PNG, then stops the server.

    python docs/capture_mlflow_compare.py --store sqlite:////abs/path/mlflow.db \
        --study margins --out docs/mlflow_compare.png

Needs the ``chromium`` package (``apt-get install chromium``); nothing else in aoq
needs it, so it is not a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=5).read()
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"mlflow server at {base} did not come up")
            time.sleep(0.5)


def post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="MLflow backend store URI")
    parser.add_argument("--study", required=True, help="the study's name (tag 'study')")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    parser.add_argument("--size", default="1600,1100", help="window size W,H")
    parser.add_argument("--wait-ms", type=int, default=20000,
                        help="virtual time Chromium gives the page to render")
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(base, server)
        experiments = post(base, "/api/2.0/mlflow/experiments/search",
                           {"max_results": 1000})["experiments"]
        ids = [e["experiment_id"] for e in experiments]
        runs = post(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": ids,
            "filter": f"tags.study = '{args.study}'",
            "max_results": 100,
        }).get("runs", [])
        children = [r for r in runs if "mlflow.parentRunId" in
                    {t["key"] for t in r["data"].get("tags", [])}]
        if not children:
            raise SystemExit(f"no trial runs of study {args.study!r} in {args.store}")
        run_ids = [r["info"]["run_id"] for r in children]
        experiment_ids = sorted({r["info"]["experiment_id"] for r in children})
        query = urllib.parse.urlencode({"runs": json.dumps(run_ids),
                                        "experiments": json.dumps(experiment_ids)})
        url = f"{base}/#/compare-runs?{query}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="aoq-chromium-") as profile:
            tmp = args.out.with_name(f".{args.out.name}.tmp.png")
            subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox",
                            "--hide-scrollbars", f"--user-data-dir={profile}",
                            f"--window-size={args.size}",
                            f"--virtual-time-budget={args.wait_ms}",
                            f"--screenshot={tmp}", url],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=300)
            os.replace(tmp, args.out)
        print(f"{len(run_ids)} runs of study {args.study!r} -> {args.out}\n{url}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
