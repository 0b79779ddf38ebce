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

Every server is served over HTTPS by default, as `policycast serve` serves: the manager with the
certificate its first start issues from its CA, the baselines with certificates of the same kind (ECDSA
P-256) from that same CA, so that the ratio compares like with like; the client trusts exactly that CA
and opens its keep-alive connections (handshakes included) before the measurement. What each side
negotiated is in the result (`tls`). `--plain-http` measures every server over plain HTTP, the figures
from before TLS.

The load generator is the benchmark's own asyncio client (`bench.load_client`: uvloop,
`asyncio.Protocol`, pre-encoded requests, a minimal HTTP/1.1 response parser): it needs nothing outside
Python, checks every response body, and counts the bytes it sends and receives. Its CPU time is
reported, as is the servers': per-core figures are requests per CPU-second of the server processes,
which holds on a shared, noisy machine where the client and the server compete for the same cores.
`--client wrk` loads with wrk instead (`make wrk`, `bench.wrk_client`): static requests, one agent per
wrk thread, non-2xx answers counted, and a sample checked in full by the Python client after each run.
On the 2-core VM of docs/performance.md both clients cost about 30 µs of CPU per request, most of it
the kernel's loopback TCP, which runs in the sender.

    python -m bench.heartbeat_throughput                  # full run, writes bench/results/
    python -m bench.heartbeat_throughput --quick          # a few seconds per measurement
    python -m bench.heartbeat_throughput --plain-http     # over plain HTTP, as before TLS
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.checkout import ROOT, commit
from bench.cold_client import ColdResult, run_cold_load
from bench.heartbeat_requests import (
    AGENT_HEARTBEAT_S,
    HEARTBEAT_PATH,
    baseline_validator,
    heartbeat_body,
    heartbeat_validator,
    http_request,
    prepare_agents,
    request_headers,
)
from bench.load_client import LoadResult, Validate, run_load, split
from bench.results import http_machine, write_result
from bench.servers import Server, baseline_server, manager_server, manager_tls, running, tls_session
from bench.wrk_client import WRK_SAMPLE, run_wrk

NAME = "heartbeat_throughput"


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
    tls: bool = True  # HTTPS, as `policycast serve` serves by default; False: plain HTTP (the old figures)
    cold: bool = True  # also a connection per heartbeat (one worker): over TLS and plain, each with baseline
    cold_processes: int = 2  # client processes of the cold phase
    cold_concurrency: int = 32  # connections in flight in the cold phase, all processes together

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
            # --plain-http here; `python -m bench --plain` turns TLS off in every benchmark
            tls=not (getattr(args, "plain_http", False) or getattr(args, "plain", False)),
            cold=not bool(getattr(args, "no_cold", False)),
            cold_processes=int(getattr(args, "cold_processes", None) or 2),
            cold_concurrency=int(getattr(args, "cold_concurrency", None) or 32),
        )
        if options.client == "wrk" and options.total is not None:
            options.client = "python"  # wrk runs for a time, not a count
        return options


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
            ssl_context=server.ssl_context,
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
        ssl_context=server.ssl_context,
    )


def _median(results: Sequence[LoadResult]) -> dict[str, Any]:
    """The round with the median throughput, plus every round's rate."""
    ordered = sorted(results, key=lambda r: r.rps)
    middle = asdict(ordered[len(ordered) // 2])
    middle["rounds_rps"] = [r.rps for r in results]
    middle["errors"] = sum(r.errors for r in results)
    middle["requests_checked"] = sum(r.bodies_checked for r in results)
    middle["requests_status_checked"] = sum(r.requests for r in results)
    return middle


async def _compare(workdir: Path, workers: int, options: Options) -> dict[str, Any]:
    """Baseline and heartbeat with `workers` workers, alternating round by round."""
    tls = manager_tls(workdir, workers) if options.tls else None
    manager = manager_server(workdir, workers, options.database_url, options.manager_root, tls=tls)
    baseline = baseline_server(workdir, workers, tls=tls)
    with running(manager, baseline):
        agents = await prepare_agents(manager, options.agents)
        # Both sides of the ratio over the same TLS (or both plain): say which, as negotiated.
        negotiated = {"manager": tls_session(manager), "baseline": tls_session(baseline)}
        heartbeat_requests = split(agents.requests, options.connections)
        baseline_requests = split(
            [
                r.replace(f":{manager.port}".encode(), f":{baseline.port}".encode(), 1)
                for r in agents.requests
            ],
            options.connections,
        )
        beats: list[LoadResult] = []
        bases: list[LoadResult] = []
        check_baseline, check_heartbeat = (
            baseline_validator(agents.serial),
            heartbeat_validator(agents.serial),
        )
        for _ in range(options.rounds):
            bases.append(await _measure(baseline, baseline_requests, check_baseline, options))
            beats.append(await _measure(manager, heartbeat_requests, check_heartbeat, options))
    base, beat = _median(bases), _median(beats)
    return {
        "workers": workers,
        "tls": negotiated,
        **_compared(base, beat),
    }


async def _floor(workdir: Path, options: Options) -> dict[str, Any]:
    """The raw ASGI floor with one worker, loaded with requests of the same shape."""
    floor = baseline_server(workdir, 1, floor=True, tls=manager_tls(workdir, 1) if options.tls else None)
    secrets = [f"pca_{'x' * 43}{i:04d}" for i in range(options.agents)]
    requests = [
        http_request("POST", HEARTBEAT_PATH, heartbeat_body(1, 1, i), request_headers(floor.port, secret))
        for i, secret in enumerate(secrets)
    ]
    with running(floor):
        validate = baseline_validator(1)
        own = split(requests, options.connections)
        results = [await _measure(floor, own, validate, options) for _ in range(options.rounds)]
        negotiated = tls_session(floor)
    return {**_median(results), "tls": negotiated}


async def _measure_cold(
    server: Server, requests: list[bytes], validate: Validate, ca_pem: bytes | None, options: Options
) -> ColdResult:
    return await asyncio.to_thread(
        functools.partial(
            run_cold_load,
            "127.0.0.1",
            server.port,
            requests,
            validate,
            ca_pem=ca_pem,
            processes=options.cold_processes,
            concurrency=options.cold_concurrency,
            duration=options.duration,
            warmup=options.warmup,
            total=options.total,
            server_pid=server.pid,
        )
    )


async def _cold(workdir: Path, tls: bool, options: Options) -> dict[str, Any]:
    """A connection per heartbeat (connect, handshake, one request, close), one worker: the manager and
    its baseline, over TLS from one CA (`tls`) or plain HTTP, alternating round by round."""
    own = workdir / f"cold-{'tls' if tls else 'plain'}"
    own.mkdir()
    bench_tls = manager_tls(own, 1) if tls else None
    ca_pem = bench_tls.ca.certificate_pem if bench_tls is not None else None
    manager = manager_server(own, 1, options.database_url, options.manager_root, tls=bench_tls)
    baseline = baseline_server(own, 1, tls=bench_tls)
    with running(manager, baseline):
        agents = await prepare_agents(manager, options.agents)
        negotiated = {"manager": tls_session(manager), "baseline": tls_session(baseline)}
        baseline_requests = [
            r.replace(f":{manager.port}".encode(), f":{baseline.port}".encode(), 1) for r in agents.requests
        ]
        check_baseline, check_heartbeat = (
            baseline_validator(agents.serial),
            heartbeat_validator(agents.serial),
        )
        beats: list[ColdResult] = []
        bases: list[ColdResult] = []
        for _ in range(options.rounds):
            bases.append(await _measure_cold(baseline, baseline_requests, check_baseline, ca_pem, options))
            beats.append(await _measure_cold(manager, agents.requests, check_heartbeat, ca_pem, options))
    base, beat = _median(bases), _median(beats)
    for median, results in ((base, bases), (beat, beats)):  # over every round, as `errors` is
        median["connections_all_rounds"] = sum(r.connections for r in results)
        median["tls_sessions_resumed"] = sum(r.tls_sessions_resumed for r in results)
    return {
        "workers": 1,
        "transport": "https" if tls else "http",
        "tls": negotiated,
        **_compared(base, beat),
    }


async def _run(options: Options) -> dict[str, Any]:
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="policycast-bench-") as tmp:
        workdir = Path(tmp)
        by_workers: dict[str, Any] = {}
        for workers in options.workers:
            by_workers[str(workers)] = await _compare(workdir, workers, options)
        floor = await _floor(workdir, options) if options.asgi_floor else None
        cold: dict[str, Any] = {}
        if options.cold:
            for tls in (True, False) if options.tls else (False,):
                cold["https" if tls else "http"] = await _cold(workdir, tls, options)
    result = _report(options, by_workers, floor, started)
    if cold:
        result["cold_1w"] = cold
        result["summary"].update(_cold_summary(cold))
        result["errors"] += sum(c[k]["errors"] for c in cold.values() for k in ("baseline", "heartbeat"))
    return result


def _cold_summary(cold: dict[str, Any]) -> dict[str, Any]:
    """Per transport: heartbeats/s and per core with a new connection each, its baseline's, the client's
    cores; over TLS, what the handshake costs the manager per heartbeat."""
    summary: dict[str, Any] = {}
    for transport, run in cold.items():
        key = f"cold_{'tls' if transport == 'https' else 'plain'}"
        beat, base = run["heartbeat"], run["baseline"]
        summary[f"{key}_heartbeat_rps_1w"] = beat["rps"]
        summary[f"{key}_heartbeat_rps_per_core"] = beat["server_rps_per_core"]
        summary[f"{key}_baseline_rps_1w"] = base["rps"]
        summary[f"{key}_baseline_rps_per_core"] = base["server_rps_per_core"]
        summary[f"{key}_ratio_1w"] = run["ratio"]
        summary[f"{key}_ratio_per_core"] = run["ratio_per_core"]
        summary[f"{key}_server_cores_used"] = _cores(beat, "server_cpu_s")
        summary[f"{key}_client_cores_used"] = _cores(beat, "client_cpu_s")
        summary[f"{key}_agents_per_core_at_5min"] = int(beat["server_rps_per_core"] * AGENT_HEARTBEAT_S)
    tls, plain = cold.get("https"), cold.get("http")
    if (
        tls
        and plain
        and tls["heartbeat"]["server_rps_per_core"]
        and plain["heartbeat"]["server_rps_per_core"]
    ):
        # CPU-µs of the manager per heartbeat: the new TLS connection's share (handshake, record layer)
        summary["cold_tls_handshake_server_cpu_us"] = round(
            1e6 / tls["heartbeat"]["server_rps_per_core"] - 1e6 / plain["heartbeat"]["server_rps_per_core"],
            1,
        )
    return summary


def _report(
    options: Options, by_workers: dict[str, Any], floor: dict[str, Any] | None, started: datetime
) -> dict[str, Any]:
    one = by_workers.get("1")
    two = by_workers.get("2")
    # First in the summary: a figure over HTTPS and one over plain HTTP are not comparable.
    summary: dict[str, Any] = {"transport": "https" if options.tls else "http"}
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
        "machine": http_machine(),
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
            "tls": options.tls,
            "manager_root": str(options.manager_root),
            "manager_commit": commit(options.manager_root),
        },
        "summary": summary,
        "errors": errors,
        "by_workers": by_workers,
        "asgi_floor_1w": floor,
    }


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
        "--plain-http",
        action="store_true",
        help="serve every server over plain HTTP (the figures from before TLS); default: HTTPS",
    )
    parser.add_argument(
        "--client", choices=["python", "wrk"], help="load generator (default: the Python client)"
    )
    parser.add_argument(
        "--no-cold",
        action="store_true",
        help="skip the cold phase (a new connection, and over TLS a full handshake, per heartbeat)",
    )
    parser.add_argument("--cold-processes", type=int, help="client processes of the cold phase (default 2)")
    parser.add_argument(
        "--cold-concurrency", type=int, help="connections in flight in the cold phase, in all (default 32)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.heartbeat_throughput", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, help=f"results file (default bench/results/{NAME}-<date>.json)")
    args = parser.parse_args(argv)
    result = run(args)
    out = write_result(NAME, result, args.out)
    print(json.dumps(result["summary"], indent=2))
    print(f"errors: {result['errors']}; results in {out}")


if __name__ == "__main__":
    main()


def _compared(base: dict[str, Any], beat: dict[str, Any]) -> dict[str, Any]:
    """The heartbeat's figures beside its baseline's, and their ratios (overall and per core)."""
    per_core = base["server_rps_per_core"]
    return {
        "baseline": base,
        "heartbeat": beat,
        "ratio": round(beat["rps"] / base["rps"], 3) if base["rps"] else None,
        "ratio_per_core": round(beat["server_rps_per_core"] / per_core, 3) if per_core else None,
    }
