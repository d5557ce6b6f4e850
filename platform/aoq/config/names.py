"""Names that become directories and tracking-store keys, and the run tags a user may set.

A run name is a directory under ``run.storage``, a Ray Train run, an MLflow run name and
the key a resumed job finds its run by; a split name is part of a file name. Such names
are identifiers with one documented character set (:data:`NAME_RULE`), so that no name
can climb out of its directory (``..``), nest (``team/exp1``) or carry quotes into a
query.

User tags (``tracking.tags.*``) sit beside the tags aoq writes itself; they must not
replace them (``tracking.tags.aoq.run_name=victim`` would make a job record itself as
another run), so aoq's names and namespaces are reserved.
"""

from __future__ import annotations

import posixpath
import re

#: Letters, digits, ``.``, ``_`` and ``-``; starts with a letter or digit; 1-128 long.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = ("1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")
#: Directories aoq keeps beside the runs in ``run.storage``.
RESERVED_RUN_NAMES = ("studies",)

#: Tag keys aoq sets on every run, and the namespaces aoq and MLflow own.
RESERVED_TAGS = ("dataset", "model", "loss_variant", "git_commit", "evaluation", "study")
RESERVED_TAG_PREFIXES = ("aoq.", "mlflow.")
#: MLflow's rule for tag keys (letters, digits, ``_ - . / :`` and spaces), which are also
#: file names in some stores; the key length is MLflow's limit.
TAG_KEY_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/: ]{0,249}")
MAX_TAG_VALUE = 5000
MAX_EXPERIMENT_NAME = 500


def name_problem(key: str, value: str) -> str | None:
    """What is wrong with ``value`` as the identifier ``key`` (None if nothing)."""
    if not NAME_PATTERN.fullmatch(value):
        return f"{key}={value!r}: must be {NAME_RULE}"
    if key == "run.name" and value in RESERVED_RUN_NAMES:
        return f"{key}={value!r}: reserved (aoq keeps its Tune studies in <run.storage>/{value})"
    return None


def tag_problem(key: str, value: str) -> str | None:
    """What is wrong with user tag ``key=value`` (None if nothing)."""
    where = f"tracking.tags.{key}"
    if key in RESERVED_TAGS or key.startswith(RESERVED_TAG_PREFIXES):
        return (f"{where}: reserved; aoq sets {', '.join(RESERVED_TAGS)} and the "
                f"{' and '.join(p + '*' for p in RESERVED_TAG_PREFIXES)} tags itself")
    if not TAG_KEY_PATTERN.fullmatch(key) or posixpath.normpath(key) != key:
        return (f"{where}: a tag key is 1-250 characters from letters, digits, _ . - / : and "
                "spaces, and no empty, '.' or '..' path segment")
    if len(value) > MAX_TAG_VALUE:
        return f"{where}: the value has {len(value)} characters; at most {MAX_TAG_VALUE}"
    return None


def experiment_problem(value: str) -> str | None:
    """What is wrong with ``tracking.experiment=value`` (None if nothing)."""
    if not value.strip() or len(value) > MAX_EXPERIMENT_NAME or not value.isprintable():
        return (f"tracking.experiment={value[:80]!r}: must be 1-{MAX_EXPERIMENT_NAME} "
                "printable characters")
    return None
