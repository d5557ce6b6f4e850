"""A private Ray head for tests: loopback only, its own ports and temp dir, token auth,
and a stop that ends exactly the processes this head started, by PID (Ray's own stop
command would end every Ray on the machine, other people's included)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
         "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
         "runtime-env-agent-port", "metrics-export-port")


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RayHead:
    """One ``ray start --head --block`` process and what it spawned."""

    env: dict[str, str]
    temp_dir: str
    ports: dict[str, int]
    process: subprocess.Popen
    log: Path
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run the ray CLI against this head (``RAY_ADDRESS`` = its job API)."""
        return subprocess.run([*RAY_CLI, *args], env={**(env or self.env),
                                                      "RAY_ADDRESS": self.dashboard},
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def processes(self) -> dict[int, psutil.Process]:
        """This head's processes, by PID: the ``ray start`` process we spawned, every
        process in the session it leads (it was started with ``start_new_session``, so
        GCS, raylet, dashboard and agents inherit that session id even if re-parented),
        and all their descendants (workers, a job's driver). Each call adds to ``seen``,
        so a process that has since left the tree is still stopped."""
        leader = self.process.pid
        found: dict[int, psutil.Process] = {}
        for pid in psutil.pids():
            try:
                if os.getsid(pid) == leader:
                    found[pid] = psutil.Process(pid)
            except (OSError, psutil.NoSuchProcess):
                continue
        try:
            found[leader] = psutil.Process(leader)
        except psutil.NoSuchProcess:
            pass
        for proc in list(found.values()):
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        self.seen.update(found)
        return found

    def stop(self) -> None:
        """SIGTERM this head's processes by PID, then SIGKILL what is left."""
        procs = list({**self.seen, **self.processes()}.values())
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int = 2, extra_env: dict[str, str] | None = None,
               ready_timeout: float = 180) -> RayHead:
    """Start a token-auth head on 127.0.0.1 and wait until its job API answers."""
    # Short: Ray's Unix socket paths under the temp dir must stay below ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="aoqr-", dir="/tmp")
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, **(extra_env or {}))
    ports = dict(zip(PORTS, free_ports(len(PORTS))))
    log = Path(temp_dir) / "ray-start.log"
    args = [*RAY_CLI, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items())]
    with open(log, "w") as fh:
        process = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    head = RayHead(env=env, temp_dir=temp_dir, ports=ports, process=process, log=log)
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ray start exited with {process.returncode}:\n"
                                   f"{log.read_text()[-3000:]}")
            head.processes()
            if head.cli("job", "list", timeout=60).returncode == 0:
                return head
            if time.monotonic() > deadline:
                raise TimeoutError(f"the head's job API did not answer in {ready_timeout}s:"
                                   f"\n{log.read_text()[-3000:]}")
            time.sleep(2)
    except BaseException:
        head.stop()
        raise
