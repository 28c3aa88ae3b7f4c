"""The processes under test: start, wait for readiness, pin to cores, read RSS, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .client import Probe, build_request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and every live descendant (a gateway's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, seconds)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        # After "pid (comm)": state, ppid, ... utime and stime are fields 14 and 15 of stat(5).
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, (0, 0.0))[1]
        todo.extend(child for child, (parent, _) in stats.items() if parent == current)
    return total


def pin(pid: int, cpus: set[int] | None) -> None:
    """Move a process, its threads, and the threads and children it makes later, to ``cpus``."""
    if not cpus:
        return
    if pid == 0:
        pid = os.getpid()
    try:
        tasks = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        tasks = [pid]
    for tid in tasks:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            out += [int(c) for c in text.split()]
    return out


def rss_mb(pid: int) -> float:
    """VmRSS of one process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Service:
    """One server process; its output goes to ``log_path``."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        port: int,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        cpus: set[int] | None = None,
        ready_path: str = "/health/ready",
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.port = port
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.cpus = cpus
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = float("nan")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Service:
        """Start and wait until ``ready_path`` answers 200; ``ready_s`` is the time that took."""
        with self.log_path.open("ab") as log:
            started = time.perf_counter()
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        pin(self.proc.pid, self.cpus)
        request = build_request("127.0.0.1", self.port, self.ready_path)
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), Probe("127.0.0.1", self.port, timeout=2) as probe:
                if probe.send(request).status == 200:
                    self.ready_s = time.perf_counter() - started
                    return self
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def workers(self) -> list[int]:
        """The processes that serve: the children of a multi-worker supervisor, else itself."""
        kids = children(self.pid)
        return kids or [self.pid]

    def rss_mb(self) -> float:
        """RSS of the largest serving process (per worker, as the budget is stated)."""
        return max(rss_mb(p) for p in self.workers())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
