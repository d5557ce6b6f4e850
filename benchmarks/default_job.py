"""Wall time and memory of the default job, ``python jobs/train.py``, side by side
(results: docs/benchmarks.md §8).

Each *variant* is a source tree (its ``jobs/train.py`` and ``platform/``): the tree of
this checkout, or an export of an older commit (``git archive <commit> | tar -x -C
DIR``), so "before" and "after" are measured in one run of this script, interleaved
(A, B, A, B ...) on the same machine. Every job runs as its own process tree, exactly as
a user starts it, with a fresh local Ray; extra ``KEY=VALUE`` overrides go to every job.

While a job runs, the whole process tree under its driver is sampled every
``--interval`` seconds from ``/proc/<pid>/smaps_rollup``: PSS (proportional set size:
each shared page is divided among the processes that map it, so the sum over processes
is the memory the tree really holds, Ray's shared-memory object store included) and RSS.
Every process is classified by its command line (driver, Ray's own processes, train
workers, the train controller, mining actors, idle Ray workers). The report gives,
per job: wall time, the peak of the tree's summed PSS and its breakdown by kind at that
moment, each kind's own peak, the most processes seen at once, the phases of the job
(read from the driver's output as it arrives) and the test rsum.

Example (the figures in docs/benchmarks.md)::

    git archive 3bf4328 | tar -x -C /work/scratch-perf/base
    python benchmarks/default_job.py --out /work/scratch-perf/dj \\
        --variant before=/work/scratch-perf/base --variant after=. --seeds 0 1 2 \\
        data.cache_dir=/work/scratch-perf/cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (kind, pattern on the command line), first match wins; anything else is "other".
KINDS: tuple[tuple[str, str], ...] = (
    ("train worker", r"RayTrainWorker"),
    ("train controller", r"TrainController"),
    ("mining actor", r"MiningWorker"),
    ("ray idle worker", r"^ray::IDLE"),
    ("ray dashboard agent", r"DashboardAgent|dashboard/agent\.py"),
    ("ray runtime-env agent", r"RuntimeEnvAgent|runtime_env"),
    ("ray dashboard modules", r"^ray-dashboard-|ray\.dashboard\.subprocesses"),
    ("ray worker (other)", r"^ray::"),
    ("ray gcs", r"gcs_server"),
    ("ray raylet", r"/raylet( |$)"),
    ("ray dashboard", r"dashboard[/_.](dashboard|agent)|dashboard\.py|/agent\.py"),
    ("ray log monitor", r"log_monitor"),
    ("ray monitor", r"monitor\.py"),
    ("ray (other)", r"/ray/|^ray[:_-]"),
)
_KIND_RE = [(kind, re.compile(pattern)) for kind, pattern in KINDS]


def classify(cmdline: str, is_root: bool = False) -> str:
    """The kind of a process from its command line (``is_root``: the job's driver)."""
    if is_root:
        return "driver"
    for kind, pattern in _KIND_RE:
        if pattern.search(cmdline):
            return kind
    return "other"


# ----------------------------------------------------------------------- /proc


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")
    except OSError:  # the process ended, or it is not ours to read
        return None


_TICK = os.sysconf("SC_CLK_TCK")


def process_table() -> tuple[dict[int, int], dict[int, float]]:
    """(pid -> parent pid, pid -> CPU seconds used so far) of every process in /proc."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read(f"/proc/{name}/stat")
        if stat is None:
            continue
        # "pid (comm) state ppid ... utime stime ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        parents[int(name)] = int(fields[1])
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return parents, cpu


def descendants(root: int, parents: dict[int, int]) -> list[int]:
    """``root`` and every process below it (by parent links)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in parents or pid == root:
            out.append(pid)
        todo.extend(children.get(pid, []))
    return out


#: Fields read from ``smaps_rollup``: PSS, its anonymous / file-backed / shared-memory
#: parts (Ray's object store is shared memory), and RSS.
MEMORY_FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Rss")


def memory_kib(pid: int) -> dict[str, int] | None:
    """:data:`MEMORY_FIELDS` of a process in KiB, or None if it is gone."""
    text = _read(f"/proc/{pid}/smaps_rollup")
    if not text:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in MEMORY_FIELDS:
            values[key] = int(rest.split()[0])
    return values if "Pss" in values else None


def cmdline_of(pid: int) -> str:
    raw = _read(f"/proc/{pid}/cmdline")
    return (raw or "").replace("\0", " ").strip()


# ----------------------------------------------------------------------- sampling


@dataclass
class TreeSampler:
    """Samples the process tree under ``root`` on a background thread."""

    root: int
    interval: float = 1.0
    samples: list[dict] = field(default_factory=list)
    kinds_seen: dict[int, str] = field(default_factory=dict)
    cpu_seen: dict[int, float] = field(default_factory=dict)
    #: CPU seconds by kind: each sample adds what a process used since the last one to
    #: the kind it has now (a Ray worker changes kind when it takes an actor).
    cpu_kinds: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    cpu_seconds: float = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def sample(self, t: float) -> dict:
        """One sample: time, per-kind sums (MiB) of :data:`MEMORY_FIELDS` and process
        counts."""
        per_kind: dict[str, dict[str, float]] = {}
        parents, cpu = process_table()
        for pid in descendants(self.root, parents):
            mem = memory_kib(pid)
            if mem is None:
                continue
            # Every time: a process forked by the raylet shows the raylet's command line
            # until it execs, and a Ray worker renames itself when it takes an actor.
            kind_name = classify(cmdline_of(pid), pid == self.root)
            self.kinds_seen[pid] = kind_name
            if pid in cpu:
                used = cpu[pid] - self.cpu_seen.get(pid, 0.0)
                self.cpu_kinds[kind_name] = self.cpu_kinds.get(kind_name, 0.0) + used
                self.cpu_seen[pid] = cpu[pid]
            kind = per_kind.setdefault(self.kinds_seen[pid],
                                       {"processes": 0, **{f: 0.0 for f in MEMORY_FIELDS}})
            for f in MEMORY_FIELDS:
                kind[f] += mem.get(f, 0) / 1024
            kind["processes"] += 1
        return {"t": t, "processes": sum(k["processes"] for k in per_kind.values()),
                **{f: sum(k[f] for k in per_kind.values()) for f in MEMORY_FIELDS},
                "kinds": per_kind}

    def cpu_by_kind(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in sorted(self.cpu_kinds.items(),
                                                  key=lambda kv: -kv[1])}

    def _loop(self) -> None:
        start = time.perf_counter()
        cpu0 = time.thread_time()
        while not self._stop.is_set():
            self.samples.append(self.sample(time.perf_counter() - start))
            self._stop.wait(self.interval)
        self.cpu_seconds = time.thread_time() - cpu0

    def summary(self) -> dict:
        """Peak of the summed PSS (with its breakdown), each kind's own peak, the most
        processes at once."""
        if not self.samples:
            return {}
        peak = max(self.samples, key=lambda s: s["Pss"])
        kinds = sorted({k for s in self.samples for k in s["kinds"]})
        own_peak = {k: max(s["kinds"].get(k, {}).get("Pss", 0.0) for s in self.samples)
                    for k in kinds}
        return {
            "peak_pss_mib": round(peak["Pss"], 1),
            "peak_at_seconds": round(peak["t"], 1),
            "at_peak_mib": {f: round(peak[f], 1) for f in MEMORY_FIELDS},
            "rss_at_peak_mib": round(peak["Rss"], 1),
            "peak_rss_mib": round(max(s["Rss"] for s in self.samples), 1),
            "max_processes": max(s["processes"] for s in self.samples),
            "at_peak": {k: {"pss_mib": round(v["Pss"], 1), "anon_mib": round(v["Pss_Anon"], 1),
                            "file_mib": round(v["Pss_File"], 1),
                            "shmem_mib": round(v["Pss_Shmem"], 1),
                            "processes": v["processes"]}
                        for k, v in sorted(peak["kinds"].items(), key=lambda kv: -kv[1]["Pss"])},
            "kind_peak_pss_mib": {k: round(v, 1) for k, v in own_peak.items()},
            # CPU seconds per kind (what a process used after its last sample is lost).
            "cpu_seconds": self.cpu_by_kind(),
            "samples": len(self.samples),
            "sampler_cpu_seconds": round(self.cpu_seconds, 2),
        }


# ----------------------------------------------------------------------- one job

#: (phase name, pattern of the driver output line that ends it), in job order.
PHASES: tuple[tuple[str, str], ...] = (
    ("start: imports, config, data check, Ray start, MLflow run", r"^\[aoq\] run "),
    ("first epoch done", r"epoch 0\b|epoch +0 "),
    ("training done", r"^\[aoq\] .*test|evaluating test|test \("),
)


def run_job(name: str, tree: Path, out: Path, overrides: Sequence[str], interval: float,
            timeout: float, extra_env: dict[str, str] | None = None) -> dict:
    """Run ``python <tree>/jobs/train.py`` with its own PYTHONPATH and sample it."""
    log_path = out / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra_env or {})
    env["PYTHONPATH"] = str(tree / "platform")
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, str(tree / "jobs" / "train.py"), *overrides]
    start = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        deadline = threading.Timer(timeout, proc.kill)
        deadline.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                t = time.perf_counter() - start
                lines.append((t, line.rstrip("\n")))
                log.write(f"{t:8.2f} {line}")
                log.flush()
            rc = proc.wait()
        finally:
            deadline.cancel()
            sampler.stop()
    wall = time.perf_counter() - start
    return {"name": name, "tree": str(tree), "command": cmd, "returncode": rc,
            "wall_seconds": round(wall, 1), "log": str(log_path),
            "phases": _phases(lines), "memory": sampler.summary(),
            "timeline": [{"t": round(s["t"], 2), "pss_mib": round(s["Pss"], 1),
                          "processes": s["processes"],
                          "kinds": {k: round(v["Pss"], 1) for k, v in s["kinds"].items()}}
                         for s in sampler.samples]}


def _phases(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds from the job's start to the first output line matching each phase."""
    found = {}
    for phase, pattern in PHASES:
        rx = re.compile(pattern)
        hit = next((t for t, line in lines if rx.search(line)), None)
        if hit is not None:
            found[phase] = round(hit, 1)
    return found


def test_metrics(storage: Path, run_name: str) -> dict[str, float]:
    path = storage / run_name / "test_metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------- report


def _variant(text: str) -> tuple[str, Path]:
    name, sep, tree = text.partition("=")
    if not sep or not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise argparse.ArgumentTypeError(f"--variant must be NAME=SOURCE_TREE, got {text!r}")
    path = Path(tree).resolve()
    if not (path / "jobs" / "train.py").is_file() or not (path / "platform" / "aoq").is_dir():
        raise argparse.ArgumentTypeError(f"--variant {name}: {path} has no jobs/train.py "
                                         "and platform/aoq")
    return name, path


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return (f"best {min(values):.1f}, median {statistics.median(values):.1f} "
            f"(n={len(values)})")


def report(results: list[dict], variants: list[str]) -> str:
    """A markdown summary: per variant, wall time, peak PSS and test rsum over jobs."""
    lines = ["| variant | jobs | wall (s) | peak PSS of the tree (MiB) | summed RSS at peak "
             "(MiB) | processes | test rsum, mean ± sd (each seed) |",
             "|---|---:|---|---|---|---:|---|"]
    for v in variants:
        rs = [r for r in results if r["variant"] == v and r["returncode"] == 0]
        if not rs:
            lines.append(f"| {v} | 0 | failed | | | | |")
            continue
        rsums = [r["test"].get("test/rsum") for r in rs if r["test"]]
        rsum_text = "-"
        if rsums:
            sd = statistics.stdev(rsums) if len(rsums) > 1 else 0.0
            rsum_text = (f"{statistics.fmean(rsums):.1f} ± {sd:.1f} ("
                         + ", ".join(f"s{r['seed']} {r['test']['test/rsum']:.1f}"
                                     for r in rs if r["test"]) + ")")
        lines.append(
            f"| {v} | {len(rs)} | {_stats([r['wall_seconds'] for r in rs])} | "
            f"{_stats([r['memory']['peak_pss_mib'] for r in rs])} | "
            f"{_stats([r['memory']['rss_at_peak_mib'] for r in rs])} | "
            f"{max(r['memory']['max_processes'] for r in rs)} | {rsum_text} |")
    lines += ["", "PSS by kind at the tree's peak (MiB, processes), job with the lowest peak "
              "of each variant:", ""]
    kinds = sorted({k for r in results if r["memory"] for k in r["memory"]["at_peak"]})
    best = {v: min((r for r in results if r["variant"] == v and r["memory"]),
                   key=lambda r: r["memory"]["peak_pss_mib"], default=None) for v in variants}
    lines.append("| kind | " + " | ".join(variants) + " |")
    lines.append("|---|" + "---:|" * len(variants))
    for k in kinds:
        cells = []
        for v in variants:
            at = best[v]["memory"]["at_peak"].get(k) if best[v] else None
            cells.append(f"{at['pss_mib']:.0f} ({at['processes']})" if at else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "CPU seconds by kind over the whole job (same jobs):", ""]
    kinds = sorted({k for r in results if r["memory"] for k in r["memory"]["cpu_seconds"]})
    lines.append("| kind | " + " | ".join(variants) + " |")
    lines.append("|---|" + "---:|" * len(variants))
    for k in kinds + ["all"]:
        cells = []
        for v in variants:
            cpu = best[v]["memory"]["cpu_seconds"] if best[v] else {}
            value = sum(cpu.values()) if k == "all" else cpu.get(k)
            cells.append(f"{value:.0f}" if value is not None else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Phases (seconds from the job's start), per job:", ""]
    for r in results:
        lines.append(f"- {r['name']}: " + "; ".join(f"{k} {v}" for k, v in r["phases"].items())
                     + f"; end {r['wall_seconds']}")
    return "\n".join(lines)


def _per_variant(parser: argparse.ArgumentParser, items: list[str], names: set[str],
                 flag: str) -> dict[str, dict[str, str]]:
    """``NAME:KEY=VALUE`` items -> {NAME: {KEY: VALUE}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, _, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if name not in names or not eq or not key:
            parser.error(f"{flag} {item!r}: expected NAME:KEY=VALUE with NAME one of "
                         f"{sorted(names)}")
        out.setdefault(name, {})[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="new directory for logs, runs, the MLflow store and results")
    parser.add_argument("--variant", type=_variant, action="append", default=None,
                        help="NAME=SOURCE_TREE (repeatable); default: this checkout as 'this'")
    parser.add_argument("--variant-env", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="an environment variable for the jobs of one variant")
    parser.add_argument("--variant-override", action="append", default=[],
                        metavar="NAME:KEY=VALUE", help="a config override for one variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="run.seed of the jobs; each seed runs every variant in turn")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="sampling period (s); one sample of ~30 processes costs ~50 ms "
                             "of CPU")
    parser.add_argument("--timeout", type=float, default=3600, help="per job (s)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for every job")
    args = parser.parse_args(argv)
    variants = args.variant or [("this", ROOT)]
    names = {n for n, _ in variants}
    envs = _per_variant(parser, args.variant_env, names, "--variant-env")
    per_overrides = _per_variant(parser, args.variant_override, names, "--variant-override")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=False)
    storage = out / "runs"
    base = [f"run.storage={storage}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
            "run.resume=false", *args.overrides]
    header = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{platform.platform()}, Python {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
              if argv is None else " ".join(argv),
              "variants": {n: {"tree": str(t), "env": envs.get(n, {}),
                               "overrides": per_overrides.get(n, {})} for n, t in variants},
              "overrides": base}
    print(json.dumps(header, indent=1), flush=True)
    results: list[dict] = []
    for seed in args.seeds:
        for name, tree in variants:
            run_name = f"{name}-seed{seed}"
            load = os.getloadavg()[0]
            print(f"[default-job] {run_name}: starting (load {load:.2f})", flush=True)
            extra = [f"{k}={v}" for k, v in per_overrides.get(name, {}).items()]
            r = run_job(run_name, tree, out, [*base, *extra, f"run.name={run_name}",
                                              f"run.seed={seed}"], args.interval, args.timeout,
                        envs.get(name))
            r.update(variant=name, seed=seed, load_before=round(load, 2),
                     load_after=round(os.getloadavg()[0], 2),
                     test=test_metrics(storage, run_name))
            results.append(r)
            mem = r["memory"]
            print(f"[default-job] {run_name}: rc {r['returncode']}, {r['wall_seconds']} s, "
                  f"peak PSS {mem.get('peak_pss_mib', 0):.0f} MiB, test rsum "
                  f"{r['test'].get('test/rsum', float('nan')):.1f}", flush=True)
            (out / "results.json").write_text(json.dumps({**header, "jobs": results},
                                                         indent=1))
    text = report(results, [n for n, _ in variants])
    (out / "report.md").write_text(text + "\n")
    print("\n" + text)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
