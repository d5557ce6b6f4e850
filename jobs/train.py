"""Train one model on Ray Train (DDP), evaluate it, and record the run in MLflow.

    python jobs/train.py                                  # VSE++ on the built-in scenes
    python jobs/train.py --config my.yaml optim.epochs=30 loss.variant=aoq
    ray job submit --working-dir . -- python jobs/train.py run.storage=/abs/path ...
"""

from __future__ import annotations

from collections.abc import Sequence

from aoq.cli import config_parser, load_from_args, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    args = config_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    cfg = load_from_args(args)  # validated here, before Ray starts

    from aoq.cluster.job import run_training
    from aoq.evaluation import format_metrics_table

    outcome = run_training(cfg)
    metrics = {k.removeprefix("test/"): v for k, v in outcome.test_metrics.items()}
    folds = f", {cfg.data.test_folds}-fold" if cfg.data.test_folds > 1 else ""
    print(format_metrics_table(metrics, title=f"test ({cfg.data.test_split}{folds}, single "
                                              f"model) - {outcome.run_name}"))
    print(f"run {outcome.run_name}: MLflow run {outcome.run_id}, outputs in "
          f"{outcome.output_dir}, {outcome.seconds:.0f}s")
    return 0


if __name__ == "__main__":
    run_cli(main)
