"""Evaluate one or more saved models on a split (several = an ensemble of scores).

    python jobs/evaluate.py --checkpoint outputs/<run>/best_model.pt
    python jobs/evaluate.py --checkpoint a/best_model.pt --checkpoint b/best_model.pt \
        data.dataset=/data/coco_precomp data.test_split=testall data.test_folds=5

An ensemble averages the models' score matrices, as the paper's reported numbers do;
results are labelled "single model" or "ensemble of N".
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from aoq.cli import config_parser, load_from_args, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a best_model.pt; repeat for an ensemble")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    cfg = load_from_args(args)

    from aoq.data.prepare import open_split, prepare_data
    from aoq.evaluation import format_metrics_table, retrieval_metrics
    from aoq.evaluation.encode import score_split
    from aoq.training.checkpoint import load_model

    prepared = prepare_data(cfg.data, progress=True)
    split = open_split(prepared, cfg.data.test_split)
    total = None
    for path in args.checkpoint:
        model, record = load_model(path)
        if record["vocab_size"] != prepared.vocab_size:
            raise SystemExit(f"error: {path} was trained with a {record['vocab_size']}-word "
                             f"vocabulary; this data's has {prepared.vocab_size}")
        scores = score_split(model, split)
        total = scores if total is None else total + scores
    assert total is not None
    metrics = retrieval_metrics(total / len(args.checkpoint), folds=cfg.data.test_folds)
    label = "single model" if len(args.checkpoint) == 1 else f"ensemble of {len(args.checkpoint)}"
    folds = f", {cfg.data.test_folds}-fold" if cfg.data.test_folds > 1 else ""
    print(format_metrics_table(metrics, title=f"{cfg.data.test_split}{folds} ({label})"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"evaluation": label, **metrics}, fh, indent=2)
    return 0


if __name__ == "__main__":
    run_cli(main)
