"""Merge the pieces of ``benchmarks/gpu.sh`` into one JSON file.

Each piece writes its own results (the default job: ``default_job/results.json``; the
step benchmark: ``step/step_results.json``; the mining benchmark: ``mining.json``) and
``gpu.sh`` records how each piece ended (``pieces.tsv``: name, exit code, seconds). A
piece that failed or ran out of its time budget is recorded as such, never dropped.

    python benchmarks/gpu_report.py OUT_DIR        # writes OUT_DIR/gpu_results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

#: piece name -> its results file, relative to OUT_DIR.
PIECES = {
    "preflight": "preflight.json",
    "default_job": "default_job/results.json",
    "step": "step/step_results.json",
    "mining": "mining.json",
}
#: Exit code of ``timeout`` when the piece ran out of time.
TIMED_OUT = 124


def read_pieces(out: Path) -> dict[str, dict]:
    """``pieces.tsv`` lines ``name<TAB>exit code<TAB>seconds`` -> {name: {...}}."""
    path = out / "pieces.tsv"
    if not path.exists():
        return {}
    pieces = {}
    for line in path.read_text().splitlines():
        name, code, seconds = line.split("\t")
        pieces[name] = {"exit_code": int(code), "seconds": float(seconds),
                        "timed_out": int(code) == TIMED_OUT}
    return pieces


def gpu_info() -> str:
    """The device as nvidia-smi names it, or why not."""
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
            check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi unavailable: {type(exc).__name__}"


def merge(out: Path) -> dict:
    """The merged report of everything under ``out``."""
    ran = read_pieces(out)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "gpu": gpu_info(),
                    "total_seconds": round(sum(p["seconds"] for p in ran.values()), 1),
                    "pieces": {}}
    for name, rel in PIECES.items():
        entry = dict(ran.get(name, {"exit_code": None, "seconds": None, "timed_out": False}))
        path = out / rel
        if path.exists():
            try:
                entry["results"] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                entry["results_error"] = f"{rel}: {exc}"
        else:
            entry["results_error"] = f"{rel} was not written"
        report["pieces"][name] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the OUT_DIR gpu.sh wrote into")
    args = parser.parse_args(argv)
    report = merge(args.out)
    target = args.out / "gpu_results.json"
    target.write_text(json.dumps(report, indent=1))
    failed = [n for n, p in report["pieces"].items() if p.get("exit_code") not in (0, None)]
    print(f"{target}: {len(report['pieces'])} pieces, {report['total_seconds']} s in all"
          + (f"; failed or timed out: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
