"""Prepare data before training: generate `scenes` or validate a precomp directory,
settle the vocabulary and cache tokenized captions, with progress.

    python jobs/prepare.py                                   # the built-in scenes
    python jobs/prepare.py data.dataset=/data/coco_precomp data.test_split=testall
"""

from __future__ import annotations

from collections.abc import Sequence

from aoq.cli import config_parser, load_from_args, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    args = config_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    cfg = load_from_args(args)

    from aoq.config.paths import check_paths
    from aoq.data.prepare import prepare_data

    check_paths(cfg, sections=("data",))
    prepared = prepare_data(cfg.data, progress=True)
    print(f"data: {prepared.directory}")
    print(f"vocabulary: {prepared.vocab_size} words ({prepared.vocab_path})")
    for name, split in prepared.splits.items():
        print(f"  {name}: {split.n_images} images x {split.n_regions} regions x "
              f"{split.feature_dim}, {split.n_images * prepared.captions_per_image} captions")
    return 0


if __name__ == "__main__":
    run_cli(main)
