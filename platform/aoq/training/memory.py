"""How much memory a training process holds, split the way that matters for scaling.

``ru_maxrss`` / ``VmHWM`` count every resident page, including pages of memory-mapped
files (features, caption tokens, candidate tables) that the kernel can drop at any
time; those grow with whatever part of the dataset a process has touched. The number
that must not grow with the dataset is the process's *anonymous* memory: its heap,
tensors, and copies. Linux reports both in ``/proc/self/status`` (``RssAnon``,
``RssFile``); :class:`MemoryWatch` samples them and keeps the peaks.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "hwm"}


def read_status() -> dict[str, float]:
    """Current ``rss``, ``anon``, ``file`` and peak ``hwm`` resident memory in MiB
    (Linux); elsewhere only ``hwm``, from ``getrusage``."""
    try:
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in _FIELDS:
                    out[_FIELDS[key]] = int(value.split()[0]) / 1024
        return out
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"hwm": peak / (1024 * 1024 if sys.platform == "darwin" else 1024)}


@dataclass
class MemoryWatch:
    """Peaks of anonymous and total resident memory over the calls to :meth:`sample`."""

    peak_anon_mib: float = 0.0
    peak_rss_mib: float = 0.0
    peak_file_mib: float = 0.0

    def sample(self) -> None:
        status = read_status()
        self.peak_anon_mib = max(self.peak_anon_mib, status.get("anon", 0.0))
        self.peak_file_mib = max(self.peak_file_mib, status.get("file", 0.0))
        self.peak_rss_mib = max(self.peak_rss_mib, status.get("hwm", status.get("rss", 0.0)))

    def as_metrics(self, prefix: str = "memory/") -> dict[str, float]:
        return {f"{prefix}peak_anon_mib": self.peak_anon_mib,
                f"{prefix}peak_file_mib": self.peak_file_mib,
                f"{prefix}peak_rss_mib": self.peak_rss_mib}


__all__ = ["MemoryWatch", "read_status"]
