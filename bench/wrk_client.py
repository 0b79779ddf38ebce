"""Benchmark 2's other load client: wrk (`make wrk`), for a cross-check of the Python client.

Static requests (no Lua `request()` or `response()` per request): thread i sends the heartbeat of agent
i on its connections; wrk counts non-2xx answers and socket errors, and the Python client
(`bench.load_client`) checks a sample of `WRK_SAMPLE` responses in full right after each run.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import tempfile
from collections.abc import Sequence

from bench.heartbeat_requests import HEARTBEAT_PATH
from bench.load_client import LoadResult, Validate, run_load
from bench.meters import children_cpu, process_tree_cpu

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
    ssl_context: ssl.SSLContext | None = None,
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
        url = f"{'https' if ssl_context else 'http'}://{host}:{port}{HEARTBEAT_PATH}"  # wrk does not verify
        if warmup > 0:
            await _wrk([*base, "-d", f"{max(1, round(warmup))}s", url])
        cpu_before = children_cpu()
        server_before = process_tree_cpu(server_pid) if server_pid else 0.0
        count, micros, received, socket_errors, status_errors, p50, p99 = await _wrk(
            [*base, "-d", f"{max(1, round(duration))}s", url]
        )
        server_cpu = (process_tree_cpu(server_pid) - server_before) if server_pid else 0.0
        client_cpu = children_cpu() - cpu_before
    sample = await run_load(host, port, requests, validate, total=WRK_SAMPLE, ssl_context=ssl_context)
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
