"""Run the paper's ablation (triplet, offtri, offquin, aoq) over several seeds.

    python jobs/ablation.py --seeds 0 1 2 --report docs/results.md

Every run gets the same budget (the same config but loss.variant and run.seed); runs are
tagged group=<--group> in MLflow. Config overrides apply to every run.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from aoq.cli import bounded, check_output_file, config_parser, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    variants = ["triplet", "offtri", "offquin", "aoq"]
    parser.add_argument("--variants", nargs="+", choices=variants, default=variants)
    parser.add_argument("--seeds", nargs="+", type=bounded(int, 0, 2**32 - 1),
                        default=[0, 1, 2])
    parser.add_argument("--group", default=f"ablation-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--report", default="docs/results.md")
    args = parser.parse_args(argv)
    check_output_file("--report", args.report)

    from aoq.cluster.ablation import run_ablation
    from aoq.config import load_config

    load_config(args.config, args.overrides)  # fail fast on a bad base config
    command = "python jobs/ablation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = run_ablation(args.config, args.overrides, variants=args.variants, seeds=args.seeds,
                         group=args.group, report_path=Path(args.report).resolve(),
                         command=command)
    print(table.round(2).to_string())
    return 0


if __name__ == "__main__":
    run_cli(main)
