"""Asynchronous table refresh, owned by rank 0 of the training workers.

``submit`` hands a weights snapshot to the mining pool and returns at once; a background
thread waits for the pool and publishes the new version. Training goes on with the
tables it has. At each epoch boundary rank 0 ``poll``\\ s; what it finds is broadcast
so that every rank switches to the same version before the same epoch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aoq.cluster.mining_pool import MiningPool
from aoq.negatives.tables import list_versions, save_tables

log = logging.getLogger("aoq.mining")


@dataclass(frozen=True)
class RefreshResult:
    """A finished refresh: the published version, or the error that ended it.

    Attributes:
        path: the version directory ("" on failure).
        version: the version number (0 on failure).
        snapshot_epochs: epochs the snapshot model had trained.
        seconds: wall time from submit to publish.
        error: "" on success, else what went wrong.
    """

    path: str
    version: int
    snapshot_epochs: int
    seconds: float
    error: str = ""


class AsyncRefresher:
    """One refresh in flight at a time, run on a background thread."""

    def __init__(self, pool: MiningPool, root: str | Path, k_captions: int, k_images: int,
                 publish: Callable[[Path], None] | None = None,
                 score_margin: float | None = None) -> None:
        """``publish(version_dir)`` runs after a version is saved and before it is
        reported (e.g. a push to run.storage, so other nodes can pull it);
        ``score_margin`` turns on the score filter of the mined tables."""
        self.pool = pool
        self.publish = publish
        self.root = Path(root)
        self.k_captions, self.k_images = k_captions, k_images
        self.score_margin = score_margin
        self._thread: threading.Thread | None = None
        self._result: RefreshResult | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, weights: dict[str, Any], version: int, snapshot_epochs: int) -> int:
        """Start mining with ``weights`` (copied now); returns the version it will publish.

        The version is never one that already exists (a resumed run may have published
        versions after its last checkpoint).
        """
        if self.busy:
            raise RuntimeError("a refresh is already running")
        existing = list_versions(self.root)
        version = max(version, existing[-1] + 1 if existing else 1)
        snapshot = {k: v.detach().cpu().clone() for k, v in weights.items()}
        self._result = None
        self._thread = threading.Thread(
            target=self._run, args=(snapshot, version, snapshot_epochs),
            name=f"aoq-refresh-v{version}", daemon=True)
        self._thread.start()
        return version

    def _run(self, weights: dict[str, Any], version: int, snapshot_epochs: int) -> None:
        start = time.perf_counter()
        try:
            i2t, t2i = self.pool.mine(weights, version, self.k_captions, self.k_images,
                                      self.score_margin)
            seconds = time.perf_counter() - start
            path = save_tables(self.root, version, i2t, t2i, epoch=snapshot_epochs,
                               source=f"model after {snapshot_epochs} epochs (actor pool, "
                                      f"{len(self.pool)} actors)", seconds=round(seconds, 3))
            if self.publish is not None:
                self.publish(path)
            result = RefreshResult(str(path), version, snapshot_epochs, seconds)
            log.info(f"table version {version} ready in {seconds:.1f}s")
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old tables
            result = RefreshResult("", 0, snapshot_epochs, time.perf_counter() - start,
                                   error=f"{type(exc).__name__}: {exc}")
            log.warning(f"table refresh v{version} failed; training continues on the "
                        f"previous tables: {result.error}")
        with self._lock:
            self._result = result

    def poll(self, wait: bool = False) -> RefreshResult | None:
        """The finished refresh not yet collected, or None; ``wait`` blocks for it."""
        if wait and self._thread is not None:
            self._thread.join()
        with self._lock:
            result, self._result = self._result, None
        if result is not None:
            self._thread = None
        return result

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.pool.shutdown()
