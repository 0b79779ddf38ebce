"""The `--control` line protocol: a benchmark drives a running fleet through stdin and stdout.

Requests are JSON lines on stdin, answers JSON lines on stdout (`emit`), one per request, as `serve`
documents. The fleet also says `{"event": "ready", ...}` once it is ready and `{"event": "stopped", ...}`
with its final summary (`agent_stub.simulator.run`).
"""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any, TextIO

import orjson

from agent_stub.measure import rss_bytes
from agent_stub.simulator import waits
from agent_stub.simulator.fleet import SimulatedFleet
from agent_stub.simulator.plan import DocumentKey, parse_key


def emit(out: TextIO, event: dict[str, Any]) -> None:
    out.write(orjson.dumps(event).decode() + "\n")
    out.flush()


def _serials(value: Any) -> dict[DocumentKey, int] | None:
    if value is None:
        return None
    return {parse_key(k): int(v) for k, v in value.items()}


async def serve(fleet: SimulatedFleet, out: TextIO) -> None:
    """Serve JSON-line requests from stdin until `stop`, end of input, or a signal.

    Requests: {"op": "summary"} | {"op": "wait_converged", "serials"?: {"g/l": n}, "since"?: t,
    "timeout_s": s} | {"op": "wait_messages", "since": t, "timeout_s": s} | {"op": "wait_sessions",
    "since": t, "timeout_s": s, "serials"?: {...}} | {"op": "rates", "since"?: t, "until"?: t} |
    {"op": "collect"} | {"op": "stop"}. Each gets one JSON line back: {"event": <op>, ...}; a bad request gets
    {"event": "error", "detail": ...}. Times are wall-clock seconds (`time.time()`).
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stopped = asyncio.ensure_future(fleet.stop_event.wait())
    try:
        while True:
            line_task = asyncio.ensure_future(reader.readline())
            await asyncio.wait({line_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not line_task.done():
                line_task.cancel()
                return
            line = line_task.result()
            if not line:
                return
            try:
                request = orjson.loads(line)
                op = request["op"]
                if op == "stop":
                    return
                emit(out, {"event": op, **await handle(fleet, op, request)})
            except Exception as exc:
                emit(out, {"event": "error", "detail": f"{type(exc).__name__}: {exc}"})
    finally:
        stopped.cancel()


async def handle(fleet: SimulatedFleet, op: str, request: dict[str, Any]) -> dict[str, Any]:
    timeout_s = float(request.get("timeout_s", 60.0))
    since = request.get("since")
    if op == "summary":
        if fleet.plan.admin_key and request.get("refresh", True):
            await fleet.current_serials()
        return fleet.summary()
    if op == "wait_converged":
        return await waits.wait_converged(
            fleet, _serials(request.get("serials")), since=since, timeout_s=timeout_s
        )
    if op == "wait_messages":
        return await waits.wait_messages(fleet, since=float(request["since"]), timeout_s=timeout_s)
    if op == "wait_sessions":
        return await waits.wait_sessions(
            fleet,
            since=float(request["since"]),
            timeout_s=timeout_s,
            serials=_serials(request.get("serials")),
        )
    if op == "rates":
        return fleet.stats.rates(since=since, until=request.get("until"))
    if op == "collect":
        gc.collect()
        return {"rss_bytes": rss_bytes()}
    raise ValueError(f"unknown op {op!r}")
