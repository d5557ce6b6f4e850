"""Querying a model: the first query encodes the split, later ones read the cache.

For a global-embedding model (``vse``) and a cross-attention one (``scan``), both at
the default sizes on the default ``scenes`` test split (1000 images, 5000 captions),
randomly initialised (the time does not depend on the weights):

* ``open_index`` cold (encode the split and write the cache) and warm (read it back);
* one text query (-> every image) and one image query (-> every caption), median of 20;
* ``jobs/query.py`` end to end, as a user runs it: the first call (cold cache) and the
  second, each a fresh process (Python, torch and the data checks included).

    python benchmarks/query.py --out /tmp/aoq-query-bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def cpu_timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, value): on a shared machine the CPU
    time says what the work costs, the wall time also what the neighbours took."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def measure_model(name: str, cfg, prepared, out: Path, repeats: int) -> dict:
    import torch

    from aoq.inspection.gallery import read_captions
    from aoq.inspection.index import open_index
    from aoq.inspection.query import search_image, search_text
    from aoq.models import build_model
    from aoq.models.files import model_record, save_file

    torch.manual_seed(0)
    model_cfg = dataclasses.replace(cfg.model, name=name)
    model = build_model(model_cfg, prepared.vocab_size, prepared.feature_dim)
    checkpoint = out / f"{name}.pt"
    save_file(checkpoint, model_record(model_cfg, model, vocab_size=prepared.vocab_size,
                                       img_dim=prepared.feature_dim))
    cache = out / f"cache-{name}"
    cold, cold_cpu, _ = cpu_timed(lambda: open_index(checkpoint, prepared, "test", cache))
    warm, warm_cpu, index = cpu_timed(lambda: open_index(checkpoint, prepared, "test", cache))
    captions = read_captions(prepared.directory, "test")
    text = [timed(lambda j=j: search_text(index, captions[j * 37 % len(captions)], 10))[0]
            for j in range(repeats)]
    image = [timed(lambda i=i: search_image(index, i * 13 % index.n_images, 10))[0]
             for i in range(repeats)]
    return {"model": name, "open_index_cold_s": cold, "open_index_warm_s": warm,
            "open_index_cold_cpu_s": cold_cpu, "open_index_warm_cpu_s": warm_cpu,
            "text_query_median_s": statistics.median(text),
            "image_query_median_s": statistics.median(image), "checkpoint": str(checkpoint)}


def cli_seconds(checkpoint: Path, cache_dir: Path) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of two ``jobs/query.py`` calls in fresh processes (cold, then
    warm); CPU is the child's user + system time."""
    command = [sys.executable, str(ROOT / "jobs" / "query.py"), "--checkpoint",
               str(checkpoint), "--text", "a red dog to the left of a blue car", "--json",
               f"data.cache_dir={cache_dir}"]
    times = []
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append((time.perf_counter() - start, (after.ru_utime - before.ru_utime)
                      + (after.ru_stime - before.ru_stime)))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch directory")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    import aoq.models  # noqa: F401 - registers the models
    from aoq.config import load_config
    from aoq.data.prepare import prepare_data

    torch.set_num_threads(2)
    cfg = load_config(None, [f"data.cache_dir={args.out / 'data'}"])
    prepared = prepare_data(cfg.data, progress=False)
    results = [measure_model(name, cfg, prepared, args.out, args.repeats)
               for name in ("vse", "scan")]
    # The CLI reads the same generated data (data.cache_dir) and starts with no index
    # cached there (measure_model cached its own elsewhere).
    first, second = cli_seconds(Path(results[0]["checkpoint"]), args.out / "data")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": results,
              "load_average": os.getloadavg(),
              "cli_vse_first_s": first[0], "cli_vse_second_s": second[0],
              "cli_vse_first_cpu_s": first[1], "cli_vse_second_cpu_s": second[1]}
    (args.out / "query_bench.json").write_text(json.dumps(report, indent=2))
    print(f"{'model':6} {'index cold (cpu)':>18} {'index warm (cpu)':>18} {'text query':>11} "
          f"{'image query':>12}")
    for r in results:
        print(f"{r['model']:6} {r['open_index_cold_s']:7.2f}s ({r['open_index_cold_cpu_s']:5.1f}s) "
              f"{r['open_index_warm_s']:7.3f}s ({r['open_index_warm_cpu_s']:5.2f}s) "
              f"{r['text_query_median_s'] * 1000:9.1f}ms "
              f"{r['image_query_median_s'] * 1000:10.1f}ms")
    print(f"jobs/query.py (vse), fresh processes: first {first[0]:.1f}s (cpu {first[1]:.1f}s), "
          f"second {second[0]:.1f}s (cpu {second[1]:.1f}s); load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
