"""Benchmark 2's load client: keep-alive HTTP/1.1 connections on raw sockets, every response checked.

asyncio (uvloop where the caller's loop is uvloop), one `asyncio.Protocol` per connection, pre-encoded
requests, a minimal HTTP/1.1 response parser, one request in flight per connection. It needs nothing
outside Python, checks every response with the caller's `Validate`, counts the bytes it sends and
receives, and reports its own CPU time and the server's (a process tree, from /proc): requests per
CPU-second of the server hold on a shared machine where client and server compete for the cores.
`LoadResult` is what a load run measured, with this client or with wrk (`bench.wrk_client`).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent_stub.measure import percentiles
from bench.meters import own_cpu, process_tree_cpu

Validate = Callable[[int, bytes], bool]
"""Whether an answer (status, body) is right."""


@dataclass
class LoadResult:
    """What one load run measured. `requests` and `rps` count only the measurement window."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    bytes_out_per_request: float = 0.0
    bytes_in_per_request: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    server_rps_per_core: float = 0.0
    first_error: str | None = None
    bodies_checked: int = 0  # responses whose body was checked (all of them, but with wrk)


class _Load:
    """State shared by the connections of one run."""

    def __init__(self, validate: Validate, *, total: int | None) -> None:
        self.validate = validate
        self.total = total
        self.measuring = total is not None
        self.stopping = False
        self.completed = 0
        self.errors = 0
        self.first_error: str | None = None
        self.latencies: list[float] = []
        self.bytes_out = 0
        self.bytes_in = 0
        self.first_done = 0.0
        self.last_done = 0.0
        self.closed: list[asyncio.Future[None]] = []

    def done(self, status: int, body: bytes, latency: float, size_out: int, size_in: int) -> None:
        if not self.measuring:
            return
        now = time.perf_counter()
        if self.completed == 0:
            self.first_done = now - latency
        self.last_done = now
        self.completed += 1
        self.latencies.append(latency)
        self.bytes_out += size_out
        self.bytes_in += size_in
        if not self.validate(status, body):
            self.errors += 1
            if self.first_error is None:
                self.first_error = f"HTTP {status}: {body[:300]!r}"
        if self.total is not None and self.completed >= self.total:
            self.stopping = True

    def failed(self, message: str) -> None:
        self.errors += 1
        self.stopping = True
        if self.first_error is None:
            self.first_error = message


class _Connection(asyncio.Protocol):
    """One keep-alive connection: send a request, read the whole response, check it, send the next."""

    def __init__(self, load: _Load, requests: Sequence[bytes], closed: asyncio.Future[None]) -> None:
        self.load = load
        self.requests = requests
        self.closed = closed
        self.index = 0
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.size_out = 0
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        if self.load.stopping:
            self.transport.close()
            return
        request = self.requests[self.index % len(self.requests)]
        self.index += 1
        self.size_out = len(request)
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            response = one_response(self.buffer)
        except ValueError as exc:
            self.load.failed(str(exc))
            self.transport.close()
            return
        if response is None:
            return
        latency = time.perf_counter() - self.sent_at
        status, body, size = response
        self.buffer.clear()
        self.load.done(status, body, latency, self.size_out, size)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.load.stopping:
            self.load.failed(f"connection lost: {exc!r}")
        if not self.closed.done():
            self.closed.set_result(None)


async def run_load(
    host: str,
    port: int,
    requests: Sequence[Sequence[bytes]],
    validate: Validate,
    *,
    duration: float = 10.0,
    warmup: float = 2.0,
    total: int | None = None,
    server_pid: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> LoadResult:
    """Drive one connection per entry of `requests` (each cycles through its own list of requests),
    over TLS with `ssl_context` (handshakes before the measurement: keep-alive connections).

    With `total`, stop after that many responses (no warm-up); else warm up for `warmup` seconds, then
    measure for `duration` seconds. Every response in the measurement is checked with `validate`."""
    loop = asyncio.get_running_loop()
    load = _Load(validate, total=total)
    closed: list[asyncio.Future[None]] = []
    for own in requests:
        future: asyncio.Future[None] = loop.create_future()
        closed.append(future)
        # asyncio and uvloop both set TCP_NODELAY on their TCP connections
        await loop.create_connection(
            functools.partial(_Connection, load, own, future),
            host,
            port,
            ssl=ssl_context,
            server_hostname=host if ssl_context is not None else None,
        )
    cpu_before = server_cpu = 0.0
    if total is None:
        await asyncio.sleep(warmup)
        if load.errors:
            raise RuntimeError(f"the load failed during warm-up: {load.first_error}")
        cpu_before = own_cpu()
        server_before = process_tree_cpu(server_pid) if server_pid else 0.0
        load.measuring = True
        await asyncio.sleep(duration)
        load.measuring = False
        server_cpu = (process_tree_cpu(server_pid) - server_before) if server_pid else 0.0
        load.stopping = True
    else:
        cpu_before = own_cpu()
        server_before = process_tree_cpu(server_pid) if server_pid else 0.0
        while not load.stopping:  # noqa: ASYNC110 - polled: connections set the flag from callbacks
            await asyncio.sleep(0.01)
        server_cpu = (process_tree_cpu(server_pid) - server_before) if server_pid else 0.0
    client_cpu = own_cpu() - cpu_before
    await asyncio.wait_for(asyncio.gather(*closed), timeout=30)
    return _summarise(load, client_cpu=client_cpu, server_cpu=server_cpu)


def _summarise(load: _Load, *, client_cpu: float, server_cpu: float) -> LoadResult:
    count = load.completed
    seconds = max(load.last_done - load.first_done, 1e-9)
    latency_ms = percentiles(latency * 1000 for latency in load.latencies)
    return LoadResult(
        requests=count,
        errors=load.errors,
        seconds=round(seconds, 3),
        rps=round(count / seconds, 1) if count else 0.0,
        p50_ms=round(latency_ms.get("p50", 0.0), 3),
        p99_ms=round(latency_ms.get("p99", 0.0), 3),
        bytes_out_per_request=round(load.bytes_out / count, 1) if count else 0.0,
        bytes_in_per_request=round(load.bytes_in / count, 1) if count else 0.0,
        client_cpu_s=round(client_cpu, 3),
        server_cpu_s=round(server_cpu, 3),
        server_rps_per_core=round(count / server_cpu, 1) if server_cpu > 0 else 0.0,
        first_error=load.first_error,
        bodies_checked=count,
    )


def split(requests: list[bytes], connections: int) -> list[list[bytes]]:
    """Give each connection its own agents (round-robin); with fewer agents, agents share connections."""
    if len(requests) >= connections:
        return [requests[i::connections] for i in range(connections)]
    return [[requests[i % len(requests)]] for i in range(connections)]


def one_response(buffer: bytearray) -> tuple[int, bytes, int] | None:
    """(status, body, bytes) of the one HTTP/1.1 response `buffer` holds, None while it is incomplete.

    Raises ValueError for a response without Content-Length (the servers under test always send one)
    or for more bytes than one response (a server answering what was not asked)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError(f"response without content-length: {head[:200]!r}")
    stop = head.find(b"\r\n", at + 2)
    size = end + 4 + int(head[at + 17 : stop if stop > 0 else len(head)])
    if len(buffer) < size:
        return None
    if len(buffer) > size:
        raise ValueError("more bytes than one response (the server answered unasked)")
    return int(buffer[9:12]), bytes(buffer[end + 4 : size]), size
