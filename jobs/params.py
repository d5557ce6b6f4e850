"""Print each model's parameter count at the paper's sizes, next to the authors' count.

    python jobs/params.py                       # COCO vocabulary (11,353 words)
    python jobs/params.py --vocab-size 8481     # Flickr30K's

Sizes: 36 x 2048 regions, word dim 300, embedding 2048 (vsrn) or 1024 (the others).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aoq.cli import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    from aoq.models import available_models, build_model, count_parameters
    from aoq.models.paper_sizes import AUTHORS, COCO_VOCAB, IMG_DIM, paper_config

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=COCO_VOCAB,
                        help="vocabulary size including the 4 special tokens")
    args = parser.parse_args(argv)
    print(f"{'model':<9}{'embed':>6}{'ours':>14}{'authors':>14}{'diff':>9}  authors' code")
    for name in available_models():
        cfg = paper_config(name)
        ours = count_parameters(build_model(cfg, args.vocab_size, IMG_DIM))
        ref = AUTHORS.get(name) if args.vocab_size == COCO_VOCAB else None
        theirs = f"{ref.parameters:,}" if ref else "-"
        diff = f"{ours - ref.parameters:+,}" if ref else "-"
        print(f"{name:<9}{cfg.embed_dim:>6}{ours:>14,}{theirs:>14}{diff:>9}  "
              f"{ref.source if ref else ''}")
        if ref and ref.note:
            print(f"{'':<9}{'':>6}{'':>14}{'':>14}{'':>9}  note: {ref.note}")
    return 0


if __name__ == "__main__":
    run_cli(main)
