"""Where a run's outputs live: a local or shared path, or a URI read through ``pyarrow.fs``.

``run.storage`` is either

* an absolute path (local disk, or a shared mount such as NFS on a cluster): the run
  writes straight into ``<storage>/<run name>``; nothing is copied; or
* a URI (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///abs/dir``, anything
  ``pyarrow.fs.FileSystem.from_uri`` resolves): every process works in a *node-local*
  copy, ``<data.cache_dir>/runs/<hash of the storage URI>/<run name>``, and copies
  finished files to storage (``push``) and missing ones from it (``pull``).

The local copy exists because candidate tables are memory-mapped (an object store
cannot be); the path of that copy is the same on every node (the config is the same
everywhere), so a table path that rank 0 broadcasts names the right file on every
node once that node has pulled it.

Atomicity: a pushed file becomes visible whole (an object PUT, or a temp file renamed
on a file system), and a directory is pushed with its ``meta.json`` last, so a reader
that waits for ``meta.json`` (see :func:`aoq.negatives.tables.list_versions`) never
sees half a table version. Pulled files land through :mod:`aoq.atomic` the same way.
Ray Train's own checkpoints go to ``RunConfig(storage_path=run.storage)``, which
reads the same URI with the same library.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import secrets
from pathlib import Path

import pyarrow
import pyarrow.fs as pafs

from aoq.atomic import atomic_write

#: Written last when a directory is pushed or pulled: its presence means "complete".
COMPLETE_MARKER = "meta.json"
_CHUNK = 8 << 20


class StorageError(OSError):
    """run.storage cannot be resolved or reached; the message names the URI."""


#: ``scheme://...`` or ``scheme:/abs/path`` (RFC 3986 scheme, two characters or more so
#: that a Windows drive letter is not one). ``file:/abs/dir`` is a URI, not a relative
#: directory named ``file:``.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:(//|/)")


def is_uri(value: str) -> bool:
    """Whether ``value`` is a URI (``s3://b/p``, ``file:///d``, ``file:/d``), not a path."""
    return bool(_URI.match(value))


def run_location(storage: str, run_name: str) -> str:
    """Where run ``run_name`` keeps its outputs under ``storage``: a path or a URI.

    Two runs are the same run exactly when their locations are equal (the tracking
    store keys runs by it)."""
    return _join_uri(storage, run_name) if is_uri(storage) else str(Path(storage) / run_name)


def _join_uri(uri: str, name: str) -> str:
    """``s3://b/p?x=1`` + ``run`` -> ``s3://b/p/run?x=1`` (query options stay at the end)."""
    base, sep, query = uri.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def writable_dir_problem(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` cannot be written (None if it can): it is created if missing
    and a probe file is written and removed, so a file in its place, a read-only mount
    or missing permissions (which ``os.access`` does not see for root) all show now."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".aoq-write-check-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return f"{directory} is not writable ({exc.strerror or exc})"
    return None


def _complete_last(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (posixpath.basename(n) == COMPLETE_MARKER, n))


class RunStorage:
    """One run's place in storage and the local directory its processes write to.

    Attributes:
        location: where the run's outputs end up (a path or a URI), for messages.
        work_dir: the local directory every process reads and writes; for a plain path
            it *is* the storage location.
        remote: True when outputs must be pushed (``run.storage`` is a URI).
    """

    def __init__(self, storage: str, run_name: str, cache_dir: str) -> None:
        if not run_name or "/" in run_name:
            raise ValueError(f"run name {run_name!r}: must be a non-empty name without '/'")
        self.storage = storage
        self.remote = is_uri(storage)
        if not self.remote:
            self.fs: pafs.FileSystem | None = None
            self.work_dir = Path(storage) / run_name
            self.location = run_location(storage, run_name)
            return
        try:
            self.fs, base = pafs.FileSystem.from_uri(storage)
        except (pyarrow.ArrowException, OSError, ValueError) as exc:
            raise StorageError(f"run.storage={storage!r}: pyarrow cannot open it ({exc})"
                               ) from None
        self.remote_root = posixpath.join(base, run_name)
        digest = hashlib.sha256(storage.encode()).hexdigest()[:12]
        self.work_dir = Path(cache_dir) / "runs" / digest / run_name
        self.location = run_location(storage, run_name)

    # ------------------------------------------------------------------ paths

    def _remote_path(self, local: str | os.PathLike) -> str:
        rel = Path(local).resolve().relative_to(self.work_dir.resolve())
        return posixpath.join(self.remote_root, rel.as_posix()) if rel.parts else \
            self.remote_root

    def owns(self, local: str | os.PathLike) -> bool:
        """Whether ``local`` lies inside this run's work directory."""
        try:
            Path(local).resolve().relative_to(self.work_dir.resolve())
        except ValueError:
            return False
        return True

    # ------------------------------------------------------------------ queries

    def _info(self, remote: str) -> pafs.FileInfo:
        assert self.fs is not None
        try:
            return self.fs.get_file_info(remote)
        except (pyarrow.ArrowException, OSError) as exc:
            raise StorageError(f"{self.location}: cannot reach storage ({exc})") from None

    def exists(self, local: str | os.PathLike | None = None) -> bool:
        """Whether ``local`` (default: the run itself) exists in storage."""
        local = self.work_dir if local is None else Path(local)
        if not self.remote:
            return local.exists()
        return self._info(self._remote_path(local)).type != pafs.FileType.NotFound

    def names(self, local_dir: str | os.PathLike) -> list[str]:
        """Entries of a directory as stored (remote listing for a URI), sorted."""
        local_dir = Path(local_dir)
        if not self.remote:
            return sorted(p.name for p in local_dir.iterdir()) if local_dir.is_dir() else []
        assert self.fs is not None
        selector = pafs.FileSelector(self._remote_path(local_dir), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except (pyarrow.ArrowException, OSError) as exc:
            raise StorageError(f"{self.location}: cannot list {local_dir.name} ({exc})"
                               ) from None
        return sorted(posixpath.basename(i.path) for i in infos)

    def check(self) -> None:
        """Fail now, with the URI, if storage cannot be written (no such bucket, bad
        credentials, read-only): a probe object is written beside the run and removed."""
        if self.remote:
            assert self.fs is not None
            probe = posixpath.join(posixpath.dirname(self.remote_root),
                                   f".aoq-write-check-{secrets.token_hex(4)}")
            try:
                if self.fs.type_name == "local":
                    self.fs.create_dir(posixpath.dirname(probe), recursive=True)
                with self.fs.open_output_stream(probe) as fh:
                    fh.write(b"ok")
                self.fs.delete_file(probe)
            except (pyarrow.ArrowException, OSError) as exc:
                raise StorageError(f"{self.location}: cannot write to run.storage ({exc})"
                                   ) from None
        else:
            problem = writable_dir_problem(self.work_dir.parent) or (
                f"{self.work_dir} exists and is not a directory"
                if self.work_dir.exists() and not self.work_dir.is_dir() else None)
            if problem:
                raise StorageError(f"run.storage={self.storage!r}: {problem}")

    # ------------------------------------------------------------------ copies

    def _upload_file(self, local: Path, remote: str) -> None:
        assert self.fs is not None
        # An object PUT appears whole (and needs no parent directories); a file system
        # needs its directories, a temp name and a rename.
        staged = remote
        if self.fs.type_name == "local":
            staged = f"{remote}.{secrets.token_hex(4)}.tmp"
            self.fs.create_dir(posixpath.dirname(remote), recursive=True)
        with open(local, "rb") as src, self.fs.open_output_stream(staged) as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
        if staged != remote:
            self.fs.move(staged, remote)

    def push(self, local: str | os.PathLike) -> None:
        """Copy a file, or a directory tree with its ``meta.json`` last, to storage.

        A no-op for a plain-path storage (the file is already there).
        """
        if not self.remote:
            return
        local = Path(local)
        try:
            if local.is_dir():
                files = [str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()]
                for rel in _complete_last(files):
                    self._upload_file(local / rel, self._remote_path(local / rel))
            else:
                self._upload_file(local, self._remote_path(local))
        except (pyarrow.ArrowException, OSError) as exc:
            raise StorageError(f"{self.location}: cannot upload {local} ({exc})") from None

    def _download_file(self, remote: str, local: Path) -> None:
        assert self.fs is not None
        local.parent.mkdir(parents=True, exist_ok=True)

        def copy(fh) -> None:
            with self.fs.open_input_stream(remote) as src:
                while chunk := src.read(_CHUNK):
                    fh.write(chunk)

        atomic_write(local, copy)

    def pull(self, local: str | os.PathLike) -> bool:
        """Make ``local`` present from storage if it is not; returns whether it exists.

        A directory counts as present once its ``meta.json`` is (directories are
        pushed and pulled with it last); a file, once it exists.
        """
        local = Path(local)
        if not self.remote:
            return local.exists()
        assert self.fs is not None
        if local.is_file() or (local / COMPLETE_MARKER).is_file():
            return True
        remote = self._remote_path(local)
        info = self._info(remote)
        try:
            if info.type == pafs.FileType.File:
                self._download_file(remote, local)
            elif info.type == pafs.FileType.Directory:
                infos = self.fs.get_file_info(pafs.FileSelector(remote, recursive=True))
                files = [i.path for i in infos if i.type == pafs.FileType.File]
                for path in _complete_last(files):
                    self._download_file(path, local / posixpath.relpath(path, remote))
            else:
                return False
        except (pyarrow.ArrowException, OSError) as exc:
            raise StorageError(f"{self.location}: cannot download {local.name} ({exc})"
                               ) from None
        return True
