"""The one exception type for invalid data on disk.

Every refusal of a data file (features, captions, vocabulary, generated splits) raises
:class:`DataError`, whose message names the offending file and, for text files, the
1-based line, so that a researcher can open the file and look instead of guessing.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DataError"]


class DataError(ValueError):
    """Invalid input data, located by file (and line, for text files).

    ``str(err)`` reads ``"<path>, line <n>: <message>"``, or ``"<path>: <message>"``
    without a line, or just ``"<message>"`` without a path.

    Attributes:
        message: the description of what is wrong, without the location.
        path: the offending file or directory, as given (``None`` if not tied to one).
        line: 1-based line number within ``path``, or ``None``.
    """

    message: str
    path: str | os.PathLike[str] | None
    line: int | None

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        if self.path is None:
            return self.message if self.line is None else f"line {self.line}: {self.message}"
        where = os.fsdecode(self.path)
        if self.line is not None:
            where = f"{where}, line {self.line}"
        return f"{where}: {self.message}"

    def __str__(self) -> str:
        return self._format()

    # BaseException pickles as ``cls(*self.args)``, which would lose the keyword-only
    # ``path``/``line``; Ray ships exceptions between processes by pickling them.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.path, self.line))


def _rebuild(
    cls: type[DataError],
    message: str,
    path: str | os.PathLike[str] | None,
    line: int | None,
) -> DataError:
    return cls(message, path=path, line=line)
