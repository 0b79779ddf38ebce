"""`policycast-agent simulate`: a fleet on a fresh event loop, from enrolment to its summary.

`run` raises the file descriptor limit, builds the event loop (uvloop when installed), prepares and
starts the fleet, waits until it is ready, then runs until `--duration`, a signal, or (with
`--control`) a `stop` request, and returns the summary (also written to `--summary`, and emitted as the
`stopped` event in control mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from agent_stub.measure import cache_missing_sniffio, raise_fd_limit
from agent_stub.simulator.control import emit, serve
from agent_stub.simulator.fleet import SimulatedFleet
from agent_stub.simulator.plan import FleetPlan
from agent_stub.simulator.stats import Progress
from fabric_core.settings import AgentSettings

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    duration_s: float | None = None
    """Stop this long after the fleet is ready (None: until SIGINT/SIGTERM, or `stop` in control mode)."""
    control: bool = False
    summary_path: Path | None = None
    progress: bool = True
    enrol_only: bool = False
    """Enrol (and keep the identities), then stop: the broker provisions accounts before a real run."""


def run(plan: FleetPlan, settings: AgentSettings, options: RunOptions) -> dict[str, Any]:
    """Run the simulation on a fresh event loop; returns the summary (also written as asked)."""
    raise_fd_limit()
    cache_missing_sniffio()
    runner = loop_factory(plan.loop)
    with asyncio.Runner(loop_factory=runner) as loop_runner:
        return loop_runner.run(_main(plan, settings, options))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


async def _main(plan: FleetPlan, settings: AgentSettings, options: RunOptions) -> dict[str, Any]:
    out = sys.stdout
    with Progress(sys.stderr, enabled=options.progress) as progress:
        fleet = SimulatedFleet(plan, settings, progress=progress)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fleet.stop_event.set)
        try:
            await fleet.prepare()
            if options.enrol_only:
                return {
                    "agents": len(fleet.agents),
                    "enrolled_now": fleet.enrolled_new,
                    "reused_identities": fleet.reused,
                    "timings": fleet.timings,
                }
            await fleet.start()
            ready = await fleet.wait_ready(plan.ready_timeout_s)
            # Everything built so far lives as long as the fleet: keep the collector from walking it.
            gc.collect()
            gc.freeze()
            progress.refresh(force=True)
            if plan.admin_key:
                await fleet.current_serials()
            if not ready:
                log.warning("not every agent was ready within %.0f s", plan.ready_timeout_s)
            if options.control:
                emit(out, {"event": "ready", "ok": ready, **fleet.summary()})
                await serve(fleet, out)
            else:
                await _run_until(fleet, options.duration_s)
            if plan.admin_key:
                with contextlib.suppress(httpx.HTTPError, RuntimeError):
                    await fleet.current_serials()
            summary = {"ready": ready, **fleet.summary()}
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await fleet.stop()
    if options.summary_path is not None:
        options.summary_path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if options.control:
        emit(out, {"event": "stopped", **summary})
    return summary


async def _run_until(fleet: SimulatedFleet, duration_s: float | None) -> None:
    limit = None if duration_s is None else time.monotonic() + duration_s
    while not fleet.stop_event.is_set():
        wait = 1.0 if limit is None else min(1.0, limit - time.monotonic())
        if wait <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fleet.stop_event.wait(), timeout=wait)
        fleet.progress.update("push sessions", fleet.push_sessions, fleet.push_wanted or 1)
        fleet.progress.refresh()
