"""Evaluate one or more saved models on a split (several = an ensemble of scores).

    python jobs/evaluate.py --checkpoint outputs/<run>/best_model.pt
    python jobs/evaluate.py --checkpoint a/best_model.pt --checkpoint b/best_model.pt \
        data.dataset=/data/coco_precomp data.test_split=testall data.test_folds=5
    python jobs/evaluate.py --checkpoint scan/best_model.pt --pool-actors 4   # shards on Ray

An ensemble averages the models' score matrices, as the paper's reported numbers do;
results are labelled "single model" or "ensemble of N". The score matrix is computed in
shards of image rows (cross-attention models score every pair by attention), with
progress, locally or spread over an actor pool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from aoq.cli import bounded, check_output_file, config_parser, load_from_args, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a best_model.pt; repeat for an ensemble")
    parser.add_argument("--pool-actors", type=bounded(int, 0, 1024), default=0,
                        help="score shards on N Ray actors (0 = in this process)")
    parser.add_argument("--pool-threads", type=bounded(int, 1, 1024), default=1,
                        help="torch threads per actor")
    parser.add_argument("--shard-images", type=bounded(int, 1, 1 << 20), default=1024,
                        help="images per shard")
    parser.add_argument("--scores-out", help="keep the score matrix in this .npy (memory-mapped)")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    cfg = load_from_args(args)
    check_output_file("--scores-out", args.scores_out)
    check_output_file("--json", args.json)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from aoq.atomic import atomic_write_text
    from aoq.cluster.ensemble import ensemble_label, ensemble_scores
    from aoq.config.paths import check_paths
    from aoq.data.prepare import prepare_data
    from aoq.evaluation import format_metrics_table, retrieval_metrics

    check_paths(cfg, sections=("data",))
    prepared = prepare_data(cfg.data, progress=True)
    scores = ensemble_scores(args.checkpoint, prepared, cfg.data.test_split,
                             pool_actors=args.pool_actors, pool_threads=args.pool_threads,
                             shard_images=args.shard_images, out_path=args.scores_out)
    metrics = retrieval_metrics(scores, folds=cfg.data.test_folds)
    label = ensemble_label(len(args.checkpoint))
    folds = f", {cfg.data.test_folds}-fold" if cfg.data.test_folds > 1 else ""
    print(format_metrics_table(metrics, title=f"{cfg.data.test_split}{folds} ({label})"))
    if args.json:
        atomic_write_text(args.json, json.dumps(
            {"evaluation": label, "checkpoints": list(args.checkpoint), **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
