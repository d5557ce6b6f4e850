"""Run a Ray Tune study: every trial a distributed training job, nested in MLflow.

    python jobs/tune.py --space tune_spaces/margins.yaml --samples 8 optim.epochs=6
    python jobs/tune.py --resume <study-name>      # continue an interrupted study

Config overrides (KEY=VALUE) apply to every trial; the sampled values go on top.
Writes <run.storage>/studies/<name>/: best_config.yaml (for jobs/train.py --config),
summary.csv and params_vs_metric.png, also logged to the study's MLflow parent run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from aoq.cli import bounded, config_parser, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--space", help="search-space YAML (tune_spaces/*.yaml)")
    parser.add_argument("--samples", type=bounded(int, 1, 100_000), default=4,
                        help="trials to sample")
    parser.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    parser.add_argument("--max-concurrent", type=bounded(int, 0, 10_000), default=0,
                        help="trials at once (0 = as many as the cluster fits)")
    parser.add_argument("--trial-cpus", type=bounded(float, 0.0, 1024.0), default=0.0,
                        help="CPUs for each trial's driver function (its workers are "
                             "reserved by its trainer)")
    parser.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0,
                        help="sampler seed")
    parser.add_argument("--name", default=f"study-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--resume", metavar="STUDY",
                        help="continue this interrupted study (its saved settings win)")
    args = parser.parse_args(argv)

    from aoq.cluster.tune_study import StudySpec, load_spec, run_study, study_dir
    from aoq.config import ConfigError, load_config

    if args.resume:
        cfg = load_config(args.config, args.overrides)  # only to find run.storage
        spec = load_spec(study_dir(cfg, args.resume))
        run_study(spec, resume=True)
        return 0
    if not args.space:
        raise ConfigError("--space is required (or --resume STUDY)")
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: must be at least 1")
    from pathlib import Path

    # Absolute, so that --resume works from any directory.
    spec = StudySpec(name=args.name, space=str(Path(args.space).resolve()),
                     config=str(Path(args.config).resolve()) if args.config else None,
                     overrides=tuple(args.overrides), samples=args.samples,
                     scheduler=args.scheduler, max_concurrent=args.max_concurrent,
                     trial_cpus=args.trial_cpus, seed=args.seed)
    run_study(spec)
    return 0


if __name__ == "__main__":
    run_cli(main)
