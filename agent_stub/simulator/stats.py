"""The fleet's counters and progress: what benchmarks read to know how busy the fleet is, and a live view.

`FleetStats` counts heartbeats (by transport, failures by kind, and those still waiting for one of the
pool's connections) and MQTT connects, with per-second buckets (wall clock) for peak rates.
`CountingClient` is each agent's manager client, feeding those counters as heartbeats leave. `Progress`
shows enrolment, starts, documents and push sessions on stderr.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent_stub.errors import ManagerError
from agent_stub.manager_client import ManagerClient
from fabric_core.wire import HeartbeatRequest, HeartbeatResponse, Mode


@dataclass
class FleetStats:
    """Fleet-wide counters, with per-second buckets (wall clock seconds) for rates."""

    heartbeats: Counter[str] = field(default_factory=Counter)
    heartbeats_per_s: Counter[int] = field(default_factory=Counter)
    pull_heartbeats_per_s: Counter[int] = field(default_factory=Counter)
    """Heartbeats sent while the agent had no push session (push agents falling back, and pull agents)."""
    heartbeat_failures: int = 0
    heartbeat_failures_per_s: Counter[int] = field(default_factory=Counter)
    heartbeat_failure_kinds: Counter[str] = field(default_factory=Counter)
    connects: int = 0
    connects_per_s: Counter[int] = field(default_factory=Counter)
    connect_failures: int = 0
    heartbeats_pending: int = 0
    """Heartbeats asked for and not answered yet: waiting for one of the pool's connections, or in flight."""

    def heartbeat(self, transport: Mode) -> None:
        second = int(time.time())
        self.heartbeats[transport] += 1
        self.heartbeats_per_s[second] += 1
        if transport == "pull":
            self.pull_heartbeats_per_s[second] += 1

    def heartbeat_failed(self, exc: Exception) -> None:
        self.heartbeat_failures += 1
        self.heartbeat_failures_per_s[int(time.time())] += 1
        cause = exc.__cause__
        self.heartbeat_failure_kinds[type(cause or exc).__name__] += 1

    def connect(self) -> None:
        self.connects += 1
        self.connects_per_s[int(time.time())] += 1

    def rates(self, since: float | None = None, until: float | None = None) -> dict[str, Any]:
        def window(counter: Counter[int]) -> dict[int, int]:
            return {
                s: n
                for s, n in counter.items()
                if (since is None or s >= int(since)) and (until is None or s <= int(until))
            }

        beats, pulls, connects, failures = (
            window(self.heartbeats_per_s),
            window(self.pull_heartbeats_per_s),
            window(self.connects_per_s),
            window(self.heartbeat_failures_per_s),
        )
        return {
            "heartbeats_peak_per_s": max(beats.values(), default=0),
            "pull_heartbeats_peak_per_s": max(pulls.values(), default=0),
            "connects_peak_per_s": max(connects.values(), default=0),
            "heartbeats": sum(beats.values()),
            "pull_heartbeats": sum(pulls.values()),
            "connects": sum(connects.values()),
            "heartbeat_failures": sum(failures.values()),
            "heartbeat_failure_kinds": dict(self.heartbeat_failure_kinds),
            "heartbeats_pending": self.heartbeats_pending,
        }


class CountingClient:
    """The agent's `ManagerClient`, counting heartbeats as they leave.

    Requests wait for one of the pool's connections in a FIFO semaphore of the pool's size rather than
    in httpcore's own queue, whose every hand-over scans all waiting requests: with thousands waiting
    (a fleet starting, or reconnecting after an outage) that scan alone used most of the simulator's CPU.
    """

    __slots__ = ("_inner", "_slots", "_stats")

    def __init__(self, inner: ManagerClient, stats: FleetStats, slots: asyncio.Semaphore) -> None:
        self._inner = inner
        self._stats = stats
        self._slots = slots

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        self._stats.heartbeats_pending += 1
        try:
            async with self._slots:
                self._stats.heartbeat(request.mode)
                try:
                    return await self._inner.heartbeat(request)
                except ManagerError as exc:
                    self._stats.heartbeat_failed(exc)
                    raise
        finally:
            self._stats.heartbeats_pending -= 1


class Progress:
    """A rich progress bar on a terminal; elsewhere one line on stderr every few seconds."""

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._console = Console(file=stream, stderr=stream is sys.stderr)
        self._live = enabled and self._console.is_terminal
        self._enabled = enabled
        self._bars: dict[str, Any] = {}
        self._last_line = 0.0
        self._values: dict[str, tuple[int, int]] = {}
        self._progress = (
            Progress(
                TextColumn("{task.description:<16}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self._console,
                auto_refresh=False,  # refreshed from the event loop: no thread
                transient=False,
            )
            if self._live
            else None
        )

    def __enter__(self) -> Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
        elif self._values:
            self._print_line()

    def update(self, name: str, done: int, total: int) -> None:
        self._values[name] = (done, total)
        if self._progress is not None:
            if name not in self._bars:
                self._bars[name] = self._progress.add_task(name, total=total)
            self._progress.update(self._bars[name], completed=done, total=total)

    def refresh(self, *, force: bool = False) -> None:
        if not self._enabled:
            return
        if self._progress is not None:
            self._progress.refresh()
            return
        now = time.monotonic()
        if force or now - self._last_line >= 5.0:
            self._last_line = now
            self._print_line()

    def _print_line(self) -> None:
        parts = [f"{name} {done}/{total}" for name, (done, total) in self._values.items()]
        self._console.print("simulate: " + ", ".join(parts), highlight=False)
