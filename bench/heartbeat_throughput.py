"""Benchmark 2: unchanged heartbeats per second, with real authentication and state lookup.

The manager runs as operators run it (`policycast serve --workers N`: uvicorn, uvloop, httptools) on
SQLite, with `--agents` enrolled agents in the root group. `--connections` keep-alive connections each
send the heartbeats of their share of the agents in turn (the agent's real secret, the serial it holds,
its location and a status like the reference agent's), one request in flight per connection, and check
every answer: 200, `changed: false`, the current serial, a plausible `next_heartbeat_s`.

The baseline is measured in the same run, by the same client, with the same request bytes: a minimal
FastAPI endpoint at the same path taking the same `HeartbeatRequest` body and returning a small JSON
(`bench/baseline_app.py`), served by uvicorn the same way with the same number of workers. With one
worker the raw ASGI floor (no framework) is measured too, for reference.

The load generator is this module's own asyncio client (uvloop, `asyncio.Protocol`, pre-encoded
requests, a minimal HTTP/1.1 response parser): it needs nothing outside Python, checks every response
body, and counts the bytes it sends and receives. Its CPU time is reported, as is the servers': per-core
figures are requests per CPU-second of the server processes, which holds on a shared, noisy machine
where the client and the server compete for the same cores. `--client wrk` loads with wrk instead
(`make wrk`): static requests, one agent per wrk thread, non-2xx answers counted, and a sample checked
in full by the Python client after each run. On the 2-core VM of docs/performance.md both clients
cost about 30 µs of CPU per request, most of it the kernel's loopback TCP, which runs in the sender.

    python -m bench.heartbeat_throughput                  # full run, writes bench/results/
    python -m bench.heartbeat_throughput --quick          # a few seconds per measurement
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

NAME = "heartbeat_throughput"
HEARTBEAT_PATH = "/agent/v1/heartbeat"
ADMIN_KEY = "pck_bench-admin-key"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
AGENT_HEARTBEAT_S = 300  # "agents per core at a 5-minute heartbeat"

Validate = Callable[[int, bytes], bool]


# --- the load generator ------------------------------------------------------------------------------


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
        buffer = self.buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self.load.failed(f"response without content-length: {head[:200]!r}")
            self.transport.close()
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop > 0 else len(head)])
        size = end + 4 + length
        if len(buffer) < size:
            return
        if len(buffer) > size:
            self.load.failed("more bytes than one response (the server answered unasked)")
            self.transport.close()
            return
        latency = time.perf_counter() - self.sent_at
        status = int(buffer[9:12])
        body = bytes(buffer[end + 4 : size])
        buffer.clear()
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
) -> LoadResult:
    """Drive one connection per entry of `requests` (each cycles through its own list of requests).

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
            lambda own=own, future=future: _Connection(load, own, future), host, port
        )
    cpu_before = server_cpu = 0.0
    if total is None:
        await asyncio.sleep(warmup)
        if load.errors:
            raise RuntimeError(f"the load failed during warm-up: {load.first_error}")
        cpu_before = _own_cpu()
        server_before = process_tree_cpu(server_pid) if server_pid else 0.0
        load.measuring = True
        await asyncio.sleep(duration)
        load.measuring = False
        server_cpu = (process_tree_cpu(server_pid) - server_before) if server_pid else 0.0
        load.stopping = True
    else:
        cpu_before = _own_cpu()
        server_before = process_tree_cpu(server_pid) if server_pid else 0.0
        while not load.stopping:  # noqa: ASYNC110 - polled: connections set the flag from callbacks
            await asyncio.sleep(0.01)
        server_cpu = (process_tree_cpu(server_pid) - server_before) if server_pid else 0.0
    client_cpu = _own_cpu() - cpu_before
    await asyncio.wait_for(asyncio.gather(*closed), timeout=30)
    return _summarise(load, client_cpu=client_cpu, server_cpu=server_cpu)


def _summarise(load: _Load, *, client_cpu: float, server_cpu: float) -> LoadResult:
    count = load.completed
    seconds = max(load.last_done - load.first_done, 1e-9)
    latencies = sorted(load.latencies)

    def quantile(q: float) -> float:
        if not latencies:
            return 0.0
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)

    return LoadResult(
        requests=count,
        errors=load.errors,
        seconds=round(seconds, 3),
        rps=round(count / seconds, 1) if count else 0.0,
        p50_ms=quantile(0.5),
        p99_ms=quantile(0.99),
        bytes_out_per_request=round(load.bytes_out / count, 1) if count else 0.0,
        bytes_in_per_request=round(load.bytes_in / count, 1) if count else 0.0,
        client_cpu_s=round(client_cpu, 3),
        server_cpu_s=round(server_cpu, 3),
        server_rps_per_core=round(count / server_cpu, 1) if server_cpu > 0 else 0.0,
        first_error=load.first_error,
        bodies_checked=count,
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of `pid` and all its living descendants (uvicorn's workers)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICKS
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu.get(current, 0.0)
        todo.extend(children.get(current, []))
    return total


def http_request(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The bytes of one HTTP/1.1 request (keep-alive is HTTP/1.1's default)."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- the servers under test --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """A server under test in its own process group, its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, port: int, root: Path = ROOT
    ) -> None:
        self.name = name
        self.root = root
        self.argv = argv
        self.env = env
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, timeout: float = 60) -> Server:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,  # its own process group: uvicorn and its workers stop together
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen within {timeout}s:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)  # its own group: uvicorn and its workers
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.popen = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _env(root: Path = ROOT, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYCAST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.update(overrides)
    return env


def manager_server(workdir: Path, workers: int, database_url: str | None = None, root: Path = ROOT) -> Server:
    """`policycast serve`, from this checkout or from `root` (another one, e.g. an older commit's)."""
    port = free_port()
    data_dir = workdir / f"manager-{workers}w"
    settings = {"POLICYCAST_DATA_DIR": str(data_dir), "POLICYCAST_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY}
    if database_url:
        settings["POLICYCAST_DATABASE_URL"] = database_url
    argv = [sys.executable, "-m", "api", "serve", "--port", str(port), "--workers", str(workers)]
    argv += ["--log-level", "warning"]
    return Server(f"manager-{workers}w", argv, _env(root, **settings), workdir, port, root)


def baseline_server(workdir: Path, workers: int, *, floor: bool = False) -> Server:
    """uvicorn as `policycast serve` runs it: same loop, HTTP parser, log level, no access log."""
    port = free_port()
    target = ["bench.baseline_app:asgi_floor"] if floor else ["--factory", "bench.baseline_app:create"]
    argv = [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    name = f"{'asgi-floor' if floor else 'fastapi-baseline'}-{workers}w"
    return Server(name, argv, _env(), workdir, port)


# --- the fleet: enrolled agents and their heartbeat requests -----------------------------------------


@dataclass(frozen=True)
class Fleet:
    serial: int
    location_id: int
    requests: list[bytes]  # one unchanged heartbeat per agent
    bodies: list[bytes] = field(repr=False)


def agent_status(index: int) -> dict[str, str]:
    """The status the reference agent sends (`agent_stub.pull`): its hostname and version."""
    return {"hostname": f"bench-host-{index:05d}", "agent_version": "0.1.0"}


def heartbeat_body(serial: int, location_id: int | None, index: int) -> bytes:
    body = {"serial": serial, "location_id": location_id, "mode": "pull", "status": agent_status(index)}
    return orjson.dumps(body)


def request_headers(port: int, secret: str) -> dict[str, str]:
    return {
        "Host": f"127.0.0.1:{port}",
        "User-Agent": "policycast-agent/0.1.0",
        "Accept": "application/json",
        "Authorization": f"Bearer {secret}",
        "Content-Type": "application/json",
    }


async def enroll_fleet(url: str, agents: int, *, concurrency: int = 8) -> list[dict[str, Any]]:
    """Enrol `agents` agents in the root group; return their enrolments."""
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        groups = (await http.get("/api/v1/groups", headers=admin_headers)).raise_for_status().json()
        root = next(g for g in groups if g["parent_id"] is None)["id"]
        token_response = await http.post(
            f"/api/v1/groups/{root}/enrollment-tokens", json={}, headers=admin_headers
        )
        token = token_response.raise_for_status().json()["token"]
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> dict[str, Any]:
            async with gate:
                body = {"token": token, "hostname": f"bench-host-{index:05d}", "facts": {}}
                response = await http.post("/agent/v1/enroll", json=body)
                return dict(response.raise_for_status().json())

        return list(await asyncio.gather(*(one(i) for i in range(agents))))


async def first_heartbeat(url: str, secret: str) -> tuple[int, int]:
    """The agent's first heartbeat (serial 0): the current serial and the location it is at."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        response = await http.post(
            HEARTBEAT_PATH,
            content=heartbeat_body(0, None, 0),
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        )
        reply = response.raise_for_status().json()
    assert reply["changed"] is True, reply
    return int(reply["serial"]), int(reply["config"]["doc"]["location_id"])


async def prepare_fleet(server: Server, agents: int) -> Fleet:
    url = f"http://127.0.0.1:{server.port}"
    await _wait_healthy(url)
    enrolments = await enroll_fleet(url, agents)
    serial, location_id = await first_heartbeat(url, enrolments[0]["secret"])
    bodies = [heartbeat_body(serial, location_id, i) for i in range(agents)]
    requests = [
        http_request("POST", HEARTBEAT_PATH, body, request_headers(server.port, e["secret"]))
        for body, e in zip(bodies, enrolments, strict=True)
    ]
    return Fleet(serial=serial, location_id=location_id, requests=requests, bodies=bodies)


async def _wait_healthy(url: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/healthz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not healthy within {within}s")
            await asyncio.sleep(0.1)


@dataclass(frozen=True)
class HeartbeatAnswer:
    """200 and exactly `{"changed":false,"serial":<current>,"next_heartbeat_s":<interval ± 50 %>}`."""

    serial: int
    heartbeat_s: int = AGENT_HEARTBEAT_S

    def __call__(self, status: int, body: bytes) -> bool:
        if status != 200:
            return False
        reply = orjson.loads(body)
        return (
            len(reply) == 3
            and reply["changed"] is False
            and reply["serial"] == self.serial
            and self.heartbeat_s // 2 <= reply["next_heartbeat_s"] <= self.heartbeat_s * 2
        )


@dataclass(frozen=True)
class BaselineAnswer:
    """200 and `{"changed": false, "serial": <serial>, "next_heartbeat_s": 300}`."""

    serial: int

    def __call__(self, status: int, body: bytes) -> bool:
        expected = {"changed": False, "serial": self.serial, "next_heartbeat_s": 300}
        return status == 200 and orjson.loads(body) == expected


def heartbeat_validator(serial: int, heartbeat_s: int = AGENT_HEARTBEAT_S) -> HeartbeatAnswer:
    return HeartbeatAnswer(serial, heartbeat_s)


def baseline_validator(serial: int) -> BaselineAnswer:
    return BaselineAnswer(serial)


# --- wrk, the other load client ---------------------------------------------------------------------

# Static requests (no Lua `request()` or `response()`), so that wrk spends a few microseconds of CPU
# per request instead of ~30: each thread sends one agent's heartbeat on its connections. wrk counts
# non-2xx answers and socket errors; bodies are checked by the Python client on a sample right after.
_WRK_SCRIPT = """
agents = {%(agents)s}
local threads = 0

function setup(thread)
  thread:set("agent", threads)
  threads = threads + 1
end

function init(args)
  local a = agents[(agent or 0) %% #agents + 1]
  wrk.method = "POST"
  wrk.body = a[2]
  wrk.headers["User-Agent"] = "policycast-agent/0.1.0"
  wrk.headers["Accept"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. a[1]
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local s = summary.errors
  io.write(string.format("POLICYCAST %%d %%d %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    summary.bytes, s.connect + s.read + s.write + s.timeout, s.status,
    latency:percentile(50), latency:percentile(99)))
end
"""
WRK_SAMPLE = 2000
"""Responses checked body and all by the Python client after each wrk run."""


def _lua_string(data: bytes) -> str:
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03d}" for b in data) + '"'


def _secret_and_body(request: bytes) -> tuple[bytes, bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    secret = head.split(b"Authorization: Bearer ", 1)[1].split(b"\r\n", 1)[0]
    return secret, body


async def run_wrk(
    host: str,
    port: int,
    requests: Sequence[Sequence[bytes]],
    validate: Validate,
    *,
    duration: float,
    warmup: float,
    server_pid: int | None = None,
    threads: int = 4,
) -> LoadResult:
    """The same load with wrk (`make wrk`): `len(requests)` connections on `threads` threads, thread
    i sending the heartbeat of agent i (so `threads` agents); then `WRK_SAMPLE` responses checked in
    full by the Python client, with every agent."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError(
            "wrk is not installed: run `make wrk` (apt-get install wrk) or use --client python"
        )
    agents = [_secret_and_body(own[0]) for own in requests[:threads]]
    script = _WRK_SCRIPT % {
        "agents": ", ".join(f"{{{_lua_string(secret)}, {_lua_string(body)}}}" for secret, body in agents)
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="policycast-wrk-") as file:
        file.write(script)
        file.flush()
        base = [wrk, "-t", str(threads), "-c", str(len(requests)), "--timeout", "10s", "-s", file.name]
        url = f"http://{host}:{port}{HEARTBEAT_PATH}"
        if warmup > 0:
            await _wrk([*base, "-d", f"{max(1, round(warmup))}s", url])
        cpu_before = _children_cpu()
        server_before = process_tree_cpu(server_pid) if server_pid else 0.0
        count, micros, received, socket_errors, status_errors, p50, p99 = await _wrk(
            [*base, "-d", f"{max(1, round(duration))}s", url]
        )
        server_cpu = (process_tree_cpu(server_pid) - server_before) if server_pid else 0.0
        client_cpu = _children_cpu() - cpu_before
    sample = await run_load(host, port, requests, validate, total=WRK_SAMPLE)
    seconds = micros / 1e6
    errors = socket_errors + status_errors + sample.errors
    first_error = sample.first_error or (
        f"wrk: {status_errors} non-2xx answers, {socket_errors} socket errors" if errors else None
    )
    return LoadResult(
        requests=count,
        errors=errors,
        seconds=round(seconds, 3),
        rps=round(count / seconds, 1) if seconds else 0.0,
        p50_ms=round(p50 / 1000, 3),
        p99_ms=round(p99 / 1000, 3),
        bytes_out_per_request=sample.bytes_out_per_request,
        bytes_in_per_request=round(received / count, 1) if count else 0.0,
        client_cpu_s=round(client_cpu, 3),
        server_cpu_s=round(server_cpu, 3),
        server_rps_per_core=round(count / server_cpu, 1) if server_cpu > 0 else 0.0,
        first_error=first_error,
        bodies_checked=sample.requests,
    )


async def _wrk(argv: list[str]) -> list[int]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    text = out.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("POLICYCAST ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{text}")
    return [int(float(x)) for x in line.split()[1:]]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def split(requests: list[bytes], connections: int) -> list[list[bytes]]:
    """Give each connection its own agents (round-robin); with fewer agents, agents share connections."""
    if len(requests) >= connections:
        return [requests[i::connections] for i in range(connections)]
    return [[requests[i % len(requests)]] for i in range(connections)]


# --- the benchmark -----------------------------------------------------------------------------------


@dataclass
class Options:
    workers: list[int] = field(default_factory=lambda: [1, 2])
    connections: int = 64
    agents: int = 256
    duration: float = 10.0
    warmup: float = 3.0
    rounds: int = 3
    asgi_floor: bool = True
    database_url: str | None = None
    total: int | None = None  # a fixed number of requests per measurement instead of a duration
    client: str = "python"  # or "wrk"
    manager_root: Path = ROOT  # the checkout the manager is served from

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        quick = bool(getattr(args, "quick", False))
        options = cls(
            workers=list(getattr(args, "workers", None) or [1, 2]),
            connections=int(getattr(args, "connections", None) or 64),
            # not `args.agents`: that is `python -m bench`'s fleet size for the push benchmarks
            agents=int(getattr(args, "heartbeat_agents", None) or (64 if quick else 256)),
            duration=float(getattr(args, "duration", None) or (3.0 if quick else 10.0)),
            warmup=float(getattr(args, "warmup", None) or (1.5 if quick else 3.0)),
            rounds=int(getattr(args, "rounds", None) or (1 if quick else 3)),
            asgi_floor=not bool(getattr(args, "no_asgi_floor", False)),
            database_url=getattr(args, "database_url", None),
            manager_root=Path(getattr(args, "manager_root", None) or ROOT),
            total=getattr(args, "requests", None),
            client=getattr(args, "client", None) or "python",
        )
        if options.client == "wrk" and options.total is not None:
            options.client = "python"  # wrk runs for a time, not a count
        return options


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        names = (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        model = next(names, model)
    import fastapi
    import uvicorn

    return {
        "hostname": platform.node(),
        "cpu": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "load_avg_at_start": os.getloadavg(),
    }


async def _measure(
    server: Server, requests: list[list[bytes]], validate: Validate, options: Options
) -> LoadResult:
    if options.client == "wrk":
        return await run_wrk(
            "127.0.0.1",
            server.port,
            requests,
            validate,
            duration=options.duration,
            warmup=options.warmup,
            server_pid=server.pid,
        )
    return await run_load(
        "127.0.0.1",
        server.port,
        requests,
        validate,
        duration=options.duration,
        warmup=options.warmup,
        total=options.total,
        server_pid=server.pid,
    )


def _median(results: list[LoadResult]) -> dict[str, Any]:
    """The round with the median throughput, plus every round's rate."""
    ordered = sorted(results, key=lambda r: r.rps)
    middle = asdict(ordered[len(ordered) // 2])
    middle["rounds_rps"] = [r.rps for r in results]
    middle["errors"] = sum(r.errors for r in results)
    middle["requests_checked"] = sum(r.bodies_checked for r in results)
    middle["requests_status_checked"] = sum(r.requests for r in results)
    return middle


@contextlib.contextmanager
def _running(*servers: Server) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()


async def _compare(workdir: Path, workers: int, options: Options) -> dict[str, Any]:
    """Baseline and heartbeat with `workers` workers, alternating round by round."""
    manager = manager_server(workdir, workers, options.database_url, options.manager_root)
    baseline = baseline_server(workdir, workers)
    with _running(manager, baseline):
        fleet = await prepare_fleet(manager, options.agents)
        heartbeat_requests = split(fleet.requests, options.connections)
        baseline_requests = split(
            [r.replace(f":{manager.port}".encode(), f":{baseline.port}".encode(), 1) for r in fleet.requests],
            options.connections,
        )
        beats: list[LoadResult] = []
        bases: list[LoadResult] = []
        check_baseline, check_heartbeat = baseline_validator(fleet.serial), heartbeat_validator(fleet.serial)
        for _ in range(options.rounds):
            bases.append(await _measure(baseline, baseline_requests, check_baseline, options))
            beats.append(await _measure(manager, heartbeat_requests, check_heartbeat, options))
    base, beat = _median(bases), _median(beats)
    return {
        "workers": workers,
        "baseline": base,
        "heartbeat": beat,
        "ratio": round(beat["rps"] / base["rps"], 3) if base["rps"] else None,
        "ratio_per_core": (
            round(beat["server_rps_per_core"] / base["server_rps_per_core"], 3)
            if base["server_rps_per_core"]
            else None
        ),
    }


async def _floor(workdir: Path, options: Options) -> dict[str, Any]:
    """The raw ASGI floor with one worker, loaded with requests of the same shape."""
    floor = baseline_server(workdir, 1, floor=True)
    secrets = [f"pca_{'x' * 43}{i:04d}" for i in range(options.agents)]
    requests = [
        http_request("POST", HEARTBEAT_PATH, heartbeat_body(1, 1, i), request_headers(floor.port, secret))
        for i, secret in enumerate(secrets)
    ]
    with _running(floor):
        validate = baseline_validator(1)
        own = split(requests, options.connections)
        results = [await _measure(floor, own, validate, options) for _ in range(options.rounds)]
    return _median(results)


async def _run(options: Options) -> dict[str, Any]:
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="policycast-bench-") as tmp:
        workdir = Path(tmp)
        by_workers: dict[str, Any] = {}
        for workers in options.workers:
            by_workers[str(workers)] = await _compare(workdir, workers, options)
        floor = await _floor(workdir, options) if options.asgi_floor else None
    return _report(options, by_workers, floor, started)


def _report(
    options: Options, by_workers: dict[str, Any], floor: dict[str, Any] | None, started: datetime
) -> dict[str, Any]:
    one = by_workers.get("1")
    two = by_workers.get("2")
    summary: dict[str, Any] = {}
    if one:
        per_core = one["heartbeat"]["server_rps_per_core"]
        summary.update(
            baseline_rps_1w=one["baseline"]["rps"],
            heartbeat_rps_1w=one["heartbeat"]["rps"],
            ratio_1w=one["ratio"],
            heartbeat_rps_per_core=per_core,
            agents_per_core_at_5min=int(per_core * AGENT_HEARTBEAT_S),
            target_ratio_1w_met=bool(one["ratio"] and one["ratio"] >= 1.0),
            aim_ratio_1w_2x_met=bool(one["ratio"] and one["ratio"] >= 2.0),
        )
    if two:
        summary.update(baseline_rps_2w=two["baseline"]["rps"], heartbeat_rps_2w=two["heartbeat"]["rps"])
        summary["ratio_2w"] = two["ratio"]
    if one and two:
        scaling = round(two["heartbeat"]["rps"] / one["heartbeat"]["rps"], 3)
        summary.update(scaling_2w_over_1w=scaling, target_scaling_met=scaling >= 1.6)
        summary["baseline_scaling_2w_over_1w"] = round(two["baseline"]["rps"] / one["baseline"]["rps"], 3)
        # What the two workers got of the machine (the client and any neighbour share its cores), and
        # how much work each CPU-second of them did compared with one worker's.
        summary["server_cores_used_1w"] = _cores(one["heartbeat"], "server_cpu_s")
        summary["server_cores_used_2w"] = _cores(two["heartbeat"], "server_cpu_s")
        summary["client_cores_used_2w"] = _cores(two["heartbeat"], "client_cpu_s")
        summary["per_core_efficiency_2w"] = round(
            two["heartbeat"]["server_rps_per_core"] / one["heartbeat"]["server_rps_per_core"], 3
        )
    if floor and one:
        summary["asgi_floor_rps_1w"] = floor["rps"]
        summary["asgi_floor_over_fastapi"] = round(floor["rps"] / one["baseline"]["rps"], 3)
    errors = sum(w[k]["errors"] for w in by_workers.values() for k in ("baseline", "heartbeat"))
    return {
        "name": NAME,
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "client": (
            f"wrk (C, epoll), static requests: thread i sends agent i's heartbeat; non-2xx and socket "
            f"errors counted; then {WRK_SAMPLE} responses per run checked in full by the Python client"
            if options.client == "wrk"
            else "bench.heartbeat_throughput: asyncio + uvloop raw-socket HTTP/1.1 keep-alive, "
            "one request in flight per connection, every response checked"
        ),
        "config": {
            "connections": options.connections,
            "agents": options.agents,
            "duration_s": options.duration,
            "warmup_s": options.warmup,
            "rounds": options.rounds,
            "database": "sqlite" if not options.database_url else options.database_url.split(":", 1)[0],
            "client": options.client,
            "manager_root": str(options.manager_root),
            "manager_commit": _commit(options.manager_root),
        },
        "summary": summary,
        "errors": errors,
        "by_workers": by_workers,
        "asgi_floor_1w": floor,
    }


def _commit(root: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=False
        )
        return out.stdout.strip()
    return ""


def _cores(result: dict[str, Any], key: str) -> float:
    return round(result[key] / result["seconds"], 2) if result["seconds"] else 0.0


def _loop_runner() -> asyncio.Runner:
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.Runner()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark 2 (the `python -m bench` entry point): see the module's docstring."""
    options = Options.from_args(args)
    with _loop_runner() as runner:
        return runner.run(_run(options))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts to measure (default 1 2)")
    parser.add_argument("--connections", type=int, help="keep-alive connections (default 64)")
    parser.add_argument("--agents", dest="heartbeat_agents", type=int, help="enrolled agents (default 256)")
    parser.add_argument("--duration", type=float, help="seconds measured per round (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per round (default 3)")
    parser.add_argument("--rounds", type=int, help="rounds, alternating baseline and heartbeat (default 3)")
    parser.add_argument("--requests", type=int, help="a fixed number of requests per round instead")
    parser.add_argument("--no-asgi-floor", action="store_true", help="skip the raw ASGI reference")
    parser.add_argument("--database-url", help="POLICYCAST_DATABASE_URL (an empty database); default SQLite")
    parser.add_argument(
        "--manager-root",
        type=Path,
        help="serve the manager from this checkout (e.g. a `git worktree` of an older commit, to measure "
        "before and after a change); the baselines are served from this one",
    )
    parser.add_argument("--quick", action="store_true", help="short rounds, one of each")
    parser.add_argument(
        "--client", choices=["python", "wrk"], help="load generator (default: the Python client)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.heartbeat_throughput", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, help=f"results file (default bench/results/{NAME}-<date>.json)")
    args = parser.parse_args(argv)
    result = run(args)
    out = args.out or RESULTS_DIR / f"{NAME}-{datetime.now(UTC).strftime('%Y-%m-%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"errors: {result['errors']}; results in {out}")


if __name__ == "__main__":
    main()
