"""Benchmark 2's cold load client: every request on a connection of its own, as a pull agent's.

A pull agent heartbeats every few minutes and uvicorn closes an idle connection after 5 s, so in
production nearly every heartbeat opens a new TCP connection and, over HTTPS, pays a full TLS handshake
(no session resumption: the reference agent keeps no tickets across heartbeats). This client does just
that, for every request: connect, handshake (trusting exactly the run's CA, checking the server's name),
send one request, read and check the whole response, close.

It runs in several processes (spawned, each with its own uvloop loop and `concurrency` connections in
flight), because a client's side of a handshake costs at least as much CPU as the server's: the figure
that matters is the server's work per CPU-second, which holds while client and server share the cores,
and the client's CPU is reported beside it. Each connection's TLS session is checked to be new
(`session_reused` false) and its local port recorded: the connection really is new each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

from agent_stub.measure import percentiles
from bench.load_client import LoadResult, Validate, one_response
from bench.meters import own_cpu, process_tree_cpu


@dataclass
class ColdResult(LoadResult):
    """A `LoadResult` whose every request had a connection (and a TLS handshake) of its own."""

    connections: int = 0  # connections opened in the measurement, one per request
    tls_sessions_resumed: int = 0  # handshakes that resumed a session (must be 0: full handshakes)
    distinct_local_ports: int = 0  # of the measured connections (the kernel reuses ports over time)
    client_processes: int = 0
    concurrency: int = 0  # connections in flight, all processes together
    tls: bool = False


@dataclass
class _Share:
    """What one client process does, and what it reports."""

    host: str
    port: int
    requests: list[bytes]
    validate: Validate
    ca_pem: bytes | None
    concurrency: int
    warmup: float
    duration: float
    total: int | None


class _OneShot(asyncio.Protocol):
    """One connection, one request, one response, then close."""

    def __init__(self, request: bytes, answer: asyncio.Future[tuple[int, bytes, int]]) -> None:
        self.request = request
        self.answer = answer
        self.buffer = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            response = one_response(self.buffer)
        except ValueError as exc:
            self._fail(str(exc))
            return
        if response is None:
            return
        if not self.answer.done():
            self.answer.set_result(response)
        self.transport.close()

    def _fail(self, message: str) -> None:
        if not self.answer.done():
            self.answer.set_exception(RuntimeError(message))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(RuntimeError(f"connection lost before the answer: {exc!r}"))


class _Tally:
    def __init__(self, share: _Share) -> None:
        self.share = share
        self.measuring = share.total is not None
        self.stopping = False
        self.started = 0  # requests begun (with a total: never more than it)
        self.completed = self.errors = self.connections = self.resumed = 0
        self.bytes_out = self.bytes_in = 0
        self.first_error: str | None = None
        self.latencies: list[float] = []
        self.ports: set[int] = set()
        self.first_done = self.last_done = 0.0
        self.cpu_start = self.cpu_end = 0.0

    def error(self, message: str) -> None:
        if self.measuring:
            self.errors += 1
            if self.first_error is None:
                self.first_error = message


async def _connection_loop(tally: _Tally, offset: int, step: int) -> None:
    share = tally.share
    loop = asyncio.get_running_loop()
    from fabric_core.tls import client_context

    context = client_context(share.ca_pem) if share.ca_pem is not None else None
    index = offset
    while not tally.stopping:
        if share.total is not None:
            if tally.started >= share.total:
                return
            tally.started += 1
        request = share.requests[index % len(share.requests)]
        index += step
        answer: asyncio.Future[tuple[int, bytes, int]] = loop.create_future()
        began = time.perf_counter()
        try:
            transport, _ = await loop.create_connection(
                functools.partial(_OneShot, request, answer),
                share.host,
                share.port,
                ssl=context,
                server_hostname=share.host if context is not None else None,
            )
            ssl_object = transport.get_extra_info("ssl_object")
            port = transport.get_extra_info("sockname")[1]
            status, body, size_in = await asyncio.wait_for(answer, timeout=30)
        except (OSError, RuntimeError, TimeoutError) as exc:
            tally.error(f"{type(exc).__name__}: {exc}")
            if share.total is not None:
                tally.stopping = True
            continue
        if not tally.measuring:
            continue
        now = time.perf_counter()
        if tally.completed == 0:
            tally.first_done = began
        tally.last_done = now
        tally.completed += 1
        tally.connections += 1
        tally.ports.add(port)
        if ssl_object is not None and ssl_object.session_reused:
            tally.resumed += 1
        tally.latencies.append(now - began)
        tally.bytes_out += len(request)
        tally.bytes_in += size_in
        if not share.validate(status, body):
            tally.error(f"HTTP {status}: {body[:300]!r}")


async def _drive(share: _Share, go: Event) -> dict[str, Any]:
    tally = _Tally(share)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    tasks = [
        asyncio.create_task(_connection_loop(tally, i, share.concurrency)) for i in range(share.concurrency)
    ]
    if share.total is None:
        await asyncio.sleep(share.warmup)
        tally.cpu_start, tally.measuring = own_cpu(), True
        await asyncio.sleep(share.duration)
        tally.measuring, tally.cpu_end = False, own_cpu()
        tally.stopping = True
    else:
        tally.cpu_start = own_cpu()
    await asyncio.gather(*tasks)
    if share.total is not None:
        tally.cpu_end = own_cpu()
    return {
        "completed": tally.completed,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "connections": tally.connections,
        "resumed": tally.resumed,
        "ports": sorted(tally.ports),
        "latencies": tally.latencies,
        "bytes_out": tally.bytes_out,
        "bytes_in": tally.bytes_in,
        "first_done": tally.first_done,
        "last_done": tally.last_done,
        "cpu_s": tally.cpu_end - tally.cpu_start,
    }


def _process(share: _Share, go: Event, ready: Any, results: Any) -> None:
    """One client process (spawned): connect `share.concurrency` at a time until told to stop."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.Runner()
    ready.put(True)
    with runner:
        try:
            results.put(runner.run(_drive(share, go)))
        except Exception as exc:  # reported to the parent, not lost in a child's stderr
            results.put({"crashed": f"{type(exc).__name__}: {exc}"})


def run_cold_load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    validate: Validate,
    *,
    ca_pem: bytes | None,
    processes: int = 2,
    concurrency: int = 32,
    duration: float = 10.0,
    warmup: float = 2.0,
    total: int | None = None,
    server_pid: int | None = None,
) -> ColdResult:
    """Every request on a new connection (TLS trusting `ca_pem`, plain HTTP without it), from
    `processes` client processes with `concurrency` connections in flight between them; the processes
    share `requests` out round-robin. With `total`, that many requests and no warm-up; else warm up for
    `warmup` seconds, then measure for `duration`. Blocking: call it from a thread in async code."""
    spawn = multiprocessing.get_context("spawn")  # no fork of a process with a running event loop
    go, ready, results = spawn.Event(), spawn.Queue(), spawn.Queue()
    per_process = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    shares = [
        _Share(
            host,
            port,
            list(requests[i::processes]) or list(requests),
            validate,
            ca_pem,
            max(1, per_process[i]),
            warmup,
            duration,
            None if total is None else total // processes + (i < total % processes),
        )
        for i in range(processes)
    ]
    workers = [spawn.Process(target=_process, args=(s, go, ready, results), daemon=True) for s in shares]
    for worker in workers:
        worker.start()
    try:
        _wait_ready(workers, ready)
        time.sleep(0.5)  # each child on to its Event.wait
        go.set()
        if total is None:
            time.sleep(warmup)
            server_before = process_tree_cpu(server_pid) if server_pid else 0.0
            time.sleep(duration)
            server_cpu = (process_tree_cpu(server_pid) - server_before) if server_pid else 0.0
            reports = [results.get(timeout=60) for _ in workers]
        else:
            server_before = process_tree_cpu(server_pid) if server_pid else 0.0
            reports = [results.get(timeout=300) for _ in workers]
            server_cpu = (process_tree_cpu(server_pid) - server_before) if server_pid else 0.0
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                with contextlib.suppress(Exception):
                    worker.kill()
    crashed = [r["crashed"] for r in reports if "crashed" in r]
    if crashed:
        raise RuntimeError(f"a cold client process failed: {crashed[0]}")
    return _summarise(reports, server_cpu, processes, sum(s.concurrency for s in shares), ca_pem is not None)


def _wait_ready(workers: list[Any], ready: Any, within: float = 60) -> None:
    """Until every client process has started (or one has died: then say so at once)."""
    deadline, pending = time.monotonic() + within, len(workers)
    while pending:
        try:
            ready.get(timeout=0.5)
            pending -= 1
        except queue.Empty:
            dead = [w for w in workers if not w.is_alive()]
            if dead:
                raise RuntimeError(f"a cold client process exited at start ({dead[0].exitcode})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cold client processes did not start within {within}s") from None


def _summarise(
    reports: list[dict[str, Any]], server_cpu: float, processes: int, concurrency: int, tls: bool
) -> ColdResult:
    count = sum(r["completed"] for r in reports)
    done = [r for r in reports if r["completed"]]
    # the processes measure the same window: the union of their first and last answers
    seconds = (
        max(
            max((r["last_done"] for r in done), default=0.0)
            - min((r["first_done"] for r in done), default=0.0),
            1e-9,
        )
        if done
        else 1e-9
    )
    # the processes' perf_counter clocks are the same monotonic clock (Linux CLOCK_MONOTONIC)
    latency_ms = percentiles(x * 1000 for r in reports for x in r["latencies"])
    errors = sum(r["errors"] for r in reports)
    ports = {p for r in reports for p in r["ports"]}
    return ColdResult(
        requests=count,
        errors=errors,
        seconds=round(seconds, 3),
        rps=round(count / seconds, 1) if count else 0.0,
        p50_ms=round(latency_ms.get("p50", 0.0), 3),
        p99_ms=round(latency_ms.get("p99", 0.0), 3),
        bytes_out_per_request=round(sum(r["bytes_out"] for r in reports) / count, 1) if count else 0.0,
        bytes_in_per_request=round(sum(r["bytes_in"] for r in reports) / count, 1) if count else 0.0,
        client_cpu_s=round(sum(r["cpu_s"] for r in reports), 3),
        server_cpu_s=round(server_cpu, 3),
        server_rps_per_core=round(count / server_cpu, 1) if server_cpu > 0 else 0.0,
        first_error=next((r["first_error"] for r in reports if r["first_error"]), None),
        bodies_checked=count,
        connections=sum(r["connections"] for r in reports),
        tls_sessions_resumed=sum(r["resumed"] for r in reports),
        distinct_local_ports=len(ports),
        client_processes=processes,
        concurrency=concurrency,
        tls=tls,
    )
