"""What the benchmarks measure the processes under test with, besides the benchmark's own figures.

- CPU seconds: of a process or a process tree (`/proc/<pid>/stat`), of this process and of its
  children (`getrusage`); `CpuMeter`, the CPU the stack and the fleet simulator used during a
  measurement.
- `HeartbeatCounter`: ASGI middleware in the manager, heartbeats received per wall-clock second.
- `ManagerProbe`: `GET /healthz` on a thread of its own, how responsive the manager stays.
"""

from __future__ import annotations

import os
import resource
import ssl
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from agent_stub.measure import percentiles
from bench.heartbeat_requests import HEARTBEAT_PATH

if TYPE_CHECKING:
    from bench.fleet import SimulatorControl
    from bench.stack import Stack

_TICKS = os.sysconf("SC_CLK_TCK")


# --- CPU seconds ---------------------------------------------------------------------------------------


def _stat_cpu(stat: bytes) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds) from the contents of `/proc/<pid>/stat`."""
    fields = stat.rsplit(b")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far (Linux), 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        return _stat_cpu(Path(f"/proc/{pid}/stat").read_bytes())[1]
    except (OSError, IndexError):
        return 0.0


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of `pid` and all its living descendants (uvicorn's workers)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid, cpu[int(entry)] = _stat_cpu(Path(f"/proc/{entry}/stat").read_bytes())
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu.get(current, 0.0)
        todo.extend(children.get(current, []))
    return total


def own_cpu() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    """User + system CPU seconds of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds used by the simulator, the broker (summed over a cluster's nodes, and per node) and
    this process (manager and bridge) since start."""

    def __init__(self, stack: Stack, sim: SimulatorControl) -> None:
        self._stack = stack
        self.pids = {"simulator": sim.pid, "manager_and_bridge": os.getpid()}
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.node_pids = list(stack.broker_pids)
        self.node_start = [cpu_seconds(pid) for pid in self.node_pids]
        self.began = time.monotonic()

    def read(self) -> dict[str, Any]:
        used: dict[str, Any] = {
            name: round(cpu_seconds(pid) - self.start[name], 2) for name, pid in self.pids.items()
        }
        nodes = []
        for index, pid in enumerate(self._stack.broker_pids):
            if index < len(self.node_pids) and pid == self.node_pids[index]:
                nodes.append(cpu_seconds(pid) - self.node_start[index])
            else:  # restarted meanwhile: the new process's time (the old one's is gone)
                nodes.append(cpu_seconds(pid))
        used["broker"] = round(sum(nodes), 2)
        if len(nodes) > 1:
            used["broker_nodes"] = [round(n, 2) for n in nodes]
        return {**used, "wall": round(time.monotonic() - self.began, 2)}


# --- the manager, watched ------------------------------------------------------------------------------


class HeartbeatCounter:
    """ASGI middleware: heartbeat requests received by the manager, per wall-clock second."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.per_s: Counter[int] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == HEARTBEAT_PATH:
            self.per_s[int(time.time())] += 1
        await self.app(scope, receive, send)

    def window(self, since: float, until: float) -> dict[str, Any]:
        counts = {s: n for s, n in list(self.per_s.items()) if int(since) <= s <= int(until)}
        return {
            "peak_per_s": max(counts.values(), default=0),
            "total": sum(counts.values()),
            "per_s": [counts.get(s, 0) for s in range(int(since), int(until) + 1)],
        }

    @classmethod
    def installed_in(cls, app: Any) -> HeartbeatCounter:
        """The counter in a started app's middleware stack (Starlette builds the stack as the app starts)."""
        while app is not None:
            if isinstance(app, cls):
                return app
            app = getattr(app, "app", None)
        raise RuntimeError("the heartbeat counter is not in the manager's middleware stack")


class ManagerProbe:
    """GET /healthz every `interval` seconds on a thread of its own: how responsive the manager stays."""

    def __init__(self, url: str, interval: float = 0.5, verify: ssl.SSLContext | bool = True) -> None:
        self.url = f"{url}/healthz"
        self.verify = verify
        """httpx's `verify`: the run's CA over HTTPS (`Stack.verify`)."""
        self.interval = interval
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="manager-probe", daemon=True)

    def __enter__(self) -> ManagerProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(timeout=30, verify=self.verify) as client:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    client.get(self.url).raise_for_status()
                    self.latencies.append(time.monotonic() - began)
                except httpx.HTTPError:
                    self.failures += 1
                self._stop.wait(self.interval)

    def result(self) -> dict[str, Any]:
        return {"healthz_latency_s": percentiles(self.latencies), "failures": self.failures}
