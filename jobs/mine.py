"""Mine offline candidate tables from a trained model checkpoint, on its own.

    python jobs/mine.py --checkpoint outputs/<run>/best_model.pt --out tables/coco \
        data.dataset=/data/coco_precomp negatives.k_captions=2000 negatives.k_images=400

The result is a new table version under --out (v0001, v0002, ...), which a training job
uses with negatives.source=tables:<out>.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from aoq.cli import config_parser, load_from_args, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a best_model.pt to mine with")
    parser.add_argument("--out", required=True, help="table root directory")
    args = parser.parse_args(argv)
    cfg = load_from_args(args)

    from aoq.config import ConfigError
    from aoq.config.paths import check_paths
    from aoq.data.prepare import open_split, prepare_data
    from aoq.negatives.checkpoints import mine_from_checkpoint
    from aoq.negatives.tables import list_versions, save_tables
    from aoq.storage import writable_dir_problem

    check_paths(cfg, sections=("data",))
    problem = writable_dir_problem(Path(args.out).resolve())
    if problem:
        raise ConfigError(f"--out {args.out}: {problem}")
    start = time.perf_counter()
    prepared = prepare_data(cfg.data, progress=True)
    split = open_split(prepared, cfg.data.train_split)
    i2t, t2i, meta = mine_from_checkpoint(args.checkpoint, split, cfg.negatives,
                                          vocab_size=prepared.vocab_size,
                                          vocab_fingerprint=prepared.vocab_fingerprint,
                                          progress=True)
    root = Path(args.out).resolve()
    versions = list_versions(root)
    path = save_tables(root, (versions[-1] + 1) if versions else 1, i2t, t2i, **meta)
    print(f"wrote {path}: i2t {i2t.shape}, t2i {t2i.shape} in {time.perf_counter() - start:.1f}s")
    print(f"use it with: negatives.source=tables:{root}")
    return 0


if __name__ == "__main__":
    run_cli(main)
