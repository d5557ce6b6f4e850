"""Full-size dry run: a `scenes` training split of COCO's size, one epoch's worth of AOQ
batches through the data path, and one exact mining round, with time and memory.

COCO's training split is 113,287 images x 36 regions x 2048 floats (33 GB as float32)
and 566,435 captions; the tables are K = 2000 captions per image and 400 images per
caption. This command builds a `scenes` split of exactly that shape (streamed to disk,
never in memory), then, in this process:

1. prepares it as a job would (validation, vocabulary, tokenised caption cache);
2. mines exact i2t / t2i tables with the default model (what one refresh costs);
3. draws every batch of one epoch (anchors, offline negatives and their positives, the
   three blocks an AOQ step encodes) through the real Dataset/DataLoader path.

It prints and writes (``coco_scale.json``) the seconds of each phase, the disk used, and
the peak anonymous and file-backed resident memory (``aoq.training.memory``): the data
stays memory-mapped, so what must not grow with the dataset is the anonymous part.

Disk-heavy (about 35 GB at full size), so not part of CI; a test runs it tiny.

    python benchmarks/coco_scale.py --out /data/aoq-coco-scale
    python benchmarks/coco_scale.py --out /tmp/small --images 8000 --feature-dim 256
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from pathlib import Path

COCO_TRAIN_IMAGES = 113_287


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(out: Path, images: int, feature_dim: int, regions: int, k_captions: int,
        k_images: int, batch_size: int, max_batches: int, workers: int) -> dict:
    import torch

    from aoq.config import load_config
    from aoq.data.prepare import open_split, prepare_data
    from aoq.models import build_model
    from aoq.negatives.from_model import mine_from_model
    from aoq.negatives.tables import save_tables
    from aoq.training.memory import MemoryWatch

    cfg = load_config(None, [
        f"data.cache_dir={out}", f"data.scenes.n_train={images}", "data.scenes.n_dev=50",
        "data.scenes.n_test=50", f"data.scenes.feature_dim={feature_dim}",
        f"data.scenes.n_regions={regions}", f"negatives.k_captions={k_captions}",
        f"negatives.k_images={k_images}", f"negatives.sampling_range={min(300, k_captions)}",
        f"optim.batch_size={batch_size}", f"data.loader_workers={workers}"])
    memory = MemoryWatch()
    result: dict = {"images": images, "captions": 5 * images, "regions": regions,
                    "feature_dim": feature_dim, "k_captions": k_captions, "k_images": k_images}

    start = time.perf_counter()
    prepared = prepare_data(cfg.data, progress=True)  # generates the split on first use
    result["prepare_seconds"] = time.perf_counter() - start
    result["disk_bytes"] = directory_bytes(Path(prepared.directory))
    memory.sample()

    train = open_split(prepared, cfg.data.train_split)
    torch.manual_seed(0)
    model = build_model(cfg.model, prepared.vocab_size, prepared.feature_dim)
    start = time.perf_counter()
    i2t, t2i = mine_from_model(model, train, k_captions=k_captions, k_images=k_images,
                               block_rows=cfg.negatives.block_rows, progress=True)
    result["mining_seconds"] = time.perf_counter() - start
    memory.sample()
    result["memory_after_mining"] = memory.as_metrics("")

    # As a training worker has them: saved once, then memory-mapped.
    shutil.rmtree(out / "tables", ignore_errors=True)  # a rerun replaces its tables
    version = save_tables(out / "tables", 1, i2t, t2i, epoch=0, source="coco_scale dry run")
    del i2t, t2i, model
    # The data path runs in a fresh process, as in a training worker (mining runs in
    # the pool's actors there): its memory then shows nothing the mining left behind.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        result.update(pool.apply(data_path, (prepared, cfg.data.train_split, str(version),
                                             cfg.negatives.sampling_range, batch_size,
                                             max_batches, workers)))
    return result


def data_path(prepared, split: str, tables_path: str, sampling_range: int, batch_size: int,
              max_batches: int, workers: int) -> dict:
    """Draw one epoch of AOQ batches (3 blocks each) in this process; time and memory."""
    from aoq.training.batches import EpochBatchSampler, PairDataset, make_loader
    from aoq.data.prepare import open_split
    from aoq.negatives.tables import load_tables
    from aoq.training.memory import MemoryWatch

    memory = MemoryWatch()
    train = open_split(prepared, split)
    tables = load_tables(tables_path, n_images=train.n_images)
    dataset = PairDataset(train, sampling_range=sampling_range, tables=tables)
    sampler = EpochBatchSampler(len(dataset), batch_size)
    n_batches = len(sampler) if max_batches <= 0 else min(max_batches, len(sampler))
    start = time.perf_counter()
    pairs = 0
    for step, batch in enumerate(make_loader(dataset, sampler, workers)):
        if step >= n_batches:
            break
        pairs += batch.size
        if step % 50 == 0:
            memory.sample()
            print(f"batch {step}/{n_batches} ({pairs / (time.perf_counter() - start):.0f} "
                  "pairs/s)", flush=True)
    memory.sample()
    seconds = time.perf_counter() - start
    return {"batches": n_batches, "batch_seconds": seconds,
            "batch_pairs_per_second": pairs / seconds,
            "memory_data_path": memory.as_metrics("")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="data and results directory")
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--k-captions", type=int, default=2000)
    parser.add_argument("--k-images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-batches", type=int, default=0, help="0 = a whole epoch")
    parser.add_argument("--loader-workers", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = run(out, args.images, args.feature_dim, args.regions, args.k_captions,
                 args.k_images, args.batch_size, args.max_batches, args.loader_workers)
    result.update({"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                   "command": "python benchmarks/coco_scale.py " + " ".join(
                       sys.argv[1:] if argv is None else argv)})
    (out / "coco_scale.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
