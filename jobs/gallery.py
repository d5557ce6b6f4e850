"""Write a retrieval gallery of a checkpoint: one self-contained HTML page.

    python jobs/gallery.py --checkpoint outputs/<run>/best_model.pt
    python jobs/gallery.py --checkpoint best_model.pt --out gallery.html --tables tables/v0002 \
        data.dataset=/data/coco_precomp

The page shows the top results of sampled test queries (text -> image and image ->
text), marked right or wrong, and the offline hard negatives of sampled training pairs
from the table version the run used last (or --tables), with the model's scores.
Pictures: the dataset's rendered images (<split>_images/), or drawings of the built-in
scenes. Without --config, the data settings are the run's own (config.yaml beside the
checkpoint). Every training run also logs its gallery as the MLflow artifact gallery.html.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aoq.cli import config_parser, load_for_checkpoint, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a best_model.pt")
    parser.add_argument("--out", help="the page to write (default: gallery.html beside the "
                                      "checkpoint)")
    parser.add_argument("--tables", help="show hard negatives of this table version (or the "
                                         "latest under this directory)")
    parser.add_argument("--queries", type=int, default=6, help="sampled queries per direction")
    parser.add_argument("--anchors", type=int, default=6, help="sampled training pairs")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    cfg = load_for_checkpoint(args, args.checkpoint)

    from aoq.data.prepare import prepare_data
    from aoq.inspection.gallery import GalleryOptions, gallery_for_checkpoint, write_gallery
    from aoq.inspection.hard_negatives import TablesInUse
    from aoq.negatives.tables import load_tables

    prepared = prepare_data(cfg.data, progress=True)
    tables = None
    if args.tables:
        loaded = load_tables(args.tables, n_images=prepared.splits[cfg.data.train_split].n_images,
                             captions_per_image=prepared.captions_per_image)
        tables = TablesInUse(loaded, f"--tables {args.tables}")
    checkpoint = Path(args.checkpoint)
    html = gallery_for_checkpoint(
        checkpoint, cfg, prepared, run_dir=checkpoint.parent, tables=tables,
        options=GalleryOptions(queries=args.queries, anchors=args.anchors, seed=args.seed),
        progress=True)
    out = write_gallery(args.out or checkpoint.parent / "gallery.html", html)
    print(f"wrote {out.resolve()} ({len(html) / 1024:.0f} KiB); open it in a browser")
    return 0


if __name__ == "__main__":
    run_cli(main)
