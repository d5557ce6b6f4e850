"""Shared command-line handling for ``jobs/*.py``: ``--config`` plus dotted overrides.

Every refusal of bad input is one ``error:`` line on stderr and exit code 2, with no
traceback: config and data errors, unusable checkpoints and storage, and malformed
command-line arguments (argparse's own errors are reduced to that one line too).
Ctrl-C before a job has anything to record ends with one line and exit code 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import aoq.models  # noqa: F401 - registers the model names that config validation checks
from aoq.cluster.console import set_verbose
from aoq.config import Config, ConfigError, load_config, options_help
from aoq.data.errors import DataError
from aoq.inspection.query import QueryError
from aoq.models.files import CheckpointError
from aoq.training.run_files import CONFIG_FILE
from aoq.storage import StorageError, writable_dir_problem

OVERRIDE_HELP = """\
Configuration: defaults < --config FILE (YAML) < overrides.
An override is KEY=VALUE with a dotted key, e.g.
    optim.epochs=20 loss.variant=aoq negatives.sampling_range=300 tracking.tags.group=ablation
Every option, with its default:
"""

#: Errors that mean "the input is wrong", reported as one line with exit code 2.
INPUT_ERRORS = (ConfigError, DataError, CheckpointError, StorageError, QueryError)


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage before an error; the rule here is one ``error:`` line."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _Verbose(argparse.Action):
    """``--verbose``: applied when parsed, so every job that uses :func:`config_parser`
    (and every process it starts) shows Ray's own output."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, True)
        set_verbose(True)


def config_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and positional overrides; ``--help`` lists
    every option with its default."""
    parser = _OneLineParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=OVERRIDE_HELP + options_help(),
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    parser.add_argument("--verbose", action=_Verbose,
                        help="also show Ray's own warnings and internal tracebacks (they are "
                             "always in Ray's logs)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides (see below)")
    return parser


def bounded(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    """An argparse ``type`` accepting ``kind`` (int or float) values in ``[low, high]``."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    return parse


def check_output_file(option: str, path: str | os.PathLike | None) -> None:
    """Refuse now an output file that could not be written at the end of a long job."""
    if path is None:
        return
    path = Path(path)
    problem = (f"{path} is a directory" if path.is_dir()
               else writable_dir_problem(path.parent.resolve()))
    if problem:
        raise ConfigError(f"{option} {path}: {problem}")


def load_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def load_for_checkpoint(args: argparse.Namespace, checkpoint: str | os.PathLike) -> Config:
    """Like :func:`load_from_args`, but without ``--config`` the run's own config
    (``config.yaml`` beside the checkpoint, when there is one) is the base, so a run's
    model is read with the data settings it was trained on; overrides still apply."""
    saved = Path(checkpoint).parent / CONFIG_FILE
    if args.config is None and saved.is_file():
        args = argparse.Namespace(**{**vars(args), "config": str(saved)})
    return load_from_args(args)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None
            ) -> None:
    """Run ``main`` and turn input errors into a one-paragraph message and exit code 2."""
    try:
        code = main(argv)
    except INPUT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
