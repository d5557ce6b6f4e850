"""Check, before a job starts, that every path option is what the job will use it as.

The schema marks each path option with what it must be (``path="file"`` or
``path="writable_dir"`` in :mod:`aoq.config.schema`); ``negatives.source`` names a
checkpoint file or a tables directory. A job checks the options it uses here, on the
driver, so that a directory given as a file, a read-only cache or a storage path that
is a file is one error naming the key, not a traceback from deep inside data
preparation or a worker. URIs are left to the code that opens them (``aoq.storage``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from aoq.config.errors import ConfigError
from aoq.config.schema import Config, iter_options
from aoq.config.validation import parse_negative_source
from aoq.storage import is_uri, writable_dir_problem


def _file_problem(option: str, path: Path) -> str | None:
    """``option`` is ``key='value'`` as the user wrote it."""
    if not path.exists():
        return f"{option}: no such file"
    if not path.is_file():
        return f"{option}: {path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{option}: {path} is not readable"
    return None


def path_problems(cfg: Config, sections: Sequence[str]) -> list[str]:
    """Every problem of the path options in ``sections`` (e.g. ``("data", "run")``)."""
    problems: list[str] = []
    for key, value, _help, meta in iter_options(cfg):
        kind = meta.get("path")
        if key.split(".")[0] not in sections or not isinstance(kind, str) or not value \
                or (kind == "storage" and is_uri(value)):
            continue
        if is_uri(value):
            problem = f"{key}={value!r}: must be a local path, not a URI"
        elif kind == "file":
            problem = _file_problem(f"{key}={value!r}", Path(value))
        else:
            problem = writable_dir_problem(value)
            problem = f"{key}={value!r}: {problem}" if problem else None
        if problem:
            problems.append(problem)
    if "negatives" in sections:
        kind, path = parse_negative_source(cfg.negatives.source)
        option = f"negatives.source={cfg.negatives.source!r}"
        if kind == "checkpoint":
            problems.append(_file_problem(option, Path(path)))
        elif kind == "tables" and not Path(path).is_dir():
            problems.append(f"{option}: no such directory")
    return [p for p in problems if p]


def check_paths(cfg: Config, sections: Sequence[str] = ("data", "negatives", "run")) -> None:
    """Raise one ConfigError naming every path option of ``sections`` that is unusable."""
    problems = path_problems(cfg, sections)
    if problems:
        raise ConfigError("unusable path:\n  - " + "\n  - ".join(problems))
