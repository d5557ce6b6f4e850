"""Query a trained model: the top-k images for a text, or the top-k captions for an image.

    python jobs/query.py --checkpoint outputs/<run>/best_model.pt --text "a red dog"
    python jobs/query.py --checkpoint outputs/<run>/best_model.pt --image 17 --k 5
    python jobs/query.py --checkpoint best_model.pt --text "two dogs" --json \
        data.dataset=/data/coco_precomp data.test_split=testall

Searches --split (default: data.test_split). Without --config, the data settings are
the run's own (config.yaml beside the checkpoint), so KEY=VALUE overrides are only
needed for a checkpoint kept elsewhere. The split's encodings are cached under
data.cache_dir (keyed by checkpoint and split), so only the first query encodes it.
--json prints {"results": [{"image": i, "score": s}, ...]} for a text and
{"results": [{"caption": j, "score": s}, ...]} for an image, with the split's indices.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from aoq.cli import config_parser, load_for_checkpoint, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a best_model.pt")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="find the images that best match this text")
    what.add_argument("--image", type=int, metavar="ID",
                      help="find the captions that best match this image of the split")
    parser.add_argument("--k", type=int, default=10, help="results to show (default 10)")
    parser.add_argument("--split", help="split to search (default: data.test_split)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cfg = load_for_checkpoint(args, args.checkpoint)

    from aoq.data.prepare import prepare_data
    from aoq.inspection.gallery import read_captions
    from aoq.inspection.index import open_index
    from aoq.inspection.query import (
        QueryError, check_image_id, check_text, search_image, search_text,
    )

    if args.k < 1:
        raise QueryError(f"--k {args.k}: ask for at least one result")
    if args.text is not None:
        check_text(args.text)  # an empty query fails before anything is loaded
    data_cfg = dataclasses.replace(cfg.data, test_split=args.split or cfg.data.test_split)
    prepared = prepare_data(data_cfg, progress=True)
    split = data_cfg.test_split
    if args.image is not None:
        check_image_id(args.image, prepared.splits[split].n_images, split)
    index = open_index(args.checkpoint, prepared, split, data_cfg.cache_dir, progress=True)
    if args.text is not None:
        hits, key = search_text(index, args.text, args.k), "image"
    else:
        hits, key = search_image(index, args.image, args.k), "caption"
    if args.json:
        print(json.dumps({"results": [{key: h.index, "score": h.score} for h in hits]}))
        return 0
    captions = read_captions(prepared.directory, split)
    cpi = index.captions_per_image
    if args.text is not None:
        print(f"top {len(hits)} {split} images for {args.text.strip()!r} ({index.model_name}):")
        for rank, h in enumerate(hits, start=1):
            print(f"{rank:4d}. image {h.index:<6d} score {h.score:8.4f}  "
                  f"{captions[h.index * cpi]}")
    else:
        print(f"top {len(hits)} captions for {split} image {args.image} ({index.model_name}; "
              "+ = one of its own captions):")
        for rank, h in enumerate(hits, start=1):
            own = "+" if h.index // cpi == args.image else " "
            print(f"{rank:4d}. {own} caption {h.index:<7d} score {h.score:8.4f}  "
                  f"{captions[h.index]}")
    return 0


if __name__ == "__main__":
    run_cli(main)
