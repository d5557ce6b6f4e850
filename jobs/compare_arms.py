"""Compare finished runs arm by arm: test rsum, negative hardness per epoch, wall time.

    python jobs/compare_arms.py --seeds 0 1 2 \
        --arm refresh=emoji-vse-aoq --arm fixed=emoji-vse-fixed-aoq \
        --first-round fixed=emoji-vse-triplet tracking.uri=sqlite:////abs/mlflow.db

Runs are named ``<prefix>-s<seed>`` (as jobs/ablation.py and the study commands in
docs/results.md name them). ``--first-round ARM=PREFIX`` names the runs an arm's tables
were mined from; their time is added to that arm's total.
"""

from __future__ import annotations

from collections.abc import Sequence

from aoq.cli import config_parser, load_from_args, run_cli
from aoq.config import ConfigError


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        label, sep, prefix = value.partition("=")
        if not sep or not label or not prefix:
            raise ConfigError(f"{flag} {value!r}: expected LABEL=RUN_PREFIX")
        out[label] = prefix
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--arm", action="append", required=True, help="LABEL=RUN_PREFIX")
    parser.add_argument("--first-round", action="append", default=[], help="LABEL=RUN_PREFIX")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    arms, first = _pairs(args.arm, "--arm"), _pairs(args.first_round, "--first-round")
    unknown = set(first) - set(arms)
    if unknown:
        raise ConfigError(f"--first-round names arms that --arm does not: {sorted(unknown)}")
    cfg = load_from_args(args)

    from aoq.cluster.arms import Arm, arms_table, summarize_run
    from aoq.cluster.tracking import resolve_tracking_uri

    uri, experiment = resolve_tracking_uri(cfg.tracking), cfg.tracking.experiment

    def runs(prefix: str) -> list:
        return [summarize_run(uri, experiment, cfg.run.storage, f"{prefix}-s{s}") for s in args.seeds]

    print(arms_table([Arm(label, runs(prefix), runs(first[label]) if label in first else [])
                      for label, prefix in arms.items()]))
    return 0


if __name__ == "__main__":
    run_cli(main)
