"""The full-size dry run command, run tiny: it generates, mines, draws an epoch of AOQ
batches and reports time and memory (the full size is a manual run; see its docstring)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_reports_every_phase(tmp_path: Path) -> None:
    # Importable by name: its data path runs in a spawned process, as a worker would.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        job = importlib.import_module("coco_scale")
        result = job.main(["--out", str(tmp_path), "--images", "300", "--feature-dim", "16",
                           "--regions", "6", "--k-captions", "60", "--k-images", "20",
                           "--batch-size", "32"])
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert result["captions"] == 1500 and result["batches"] == 1500 // 32 + 1
    for key in ("prepare_seconds", "mining_seconds", "batch_seconds", "disk_bytes"):
        assert result[key] > 0, key
    # 300 x 6 x 16 float32 features are on disk, not in the report's memory peaks.
    assert result["disk_bytes"] > 300 * 6 * 16 * 4
    assert result["memory_data_path"]["peak_anon_mib"] > 0
    assert json.loads((tmp_path / "coco_scale.json").read_text())["images"] == 300
