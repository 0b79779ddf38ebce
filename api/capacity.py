"""Capacity planning from measured costs: `policycast plan --agents N --mode push|pull --heartbeat 5m`.

The costs come from the benchmarks (docs/performance.md) and are stored beside this module in
`capacity_costs.json`, with the date and the machine they were measured on:

- heartbeats per second per core of the api (benchmark 2: unchanged heartbeats, real authentication
  and state lookup, requests per CPU-second of the uvicorn worker processes). From a result that has
  it, the cold rate over TLS: each heartbeat on a new connection with a full TLS handshake, as in
  production, where an agent heartbeats every few minutes and uvicorn closes an idle connection after
  5 s (`heartbeat_connection: "new-tls"`); else the keep-alive rate (`"keep-alive"`);
- bytes on the wire of an unchanged heartbeat, of a heartbeat that brings a new document, of a push
  agent's keep-alives per hour, and of the retained PUBLISH of a new document (benchmark 3); with
  `"new-tls"`, each heartbeat also carries its connection's TCP and TLS handshakes (`connection_*`).

Every agent heartbeats at its interval in both modes (push agents for their uploads and as the fallback);
push adds one broker connection per agent, its keep-alives, and documents published at once instead of
fetched at the next heartbeat. Regenerate the costs after a benchmark run with

    python -m api.capacity bench/results/heartbeat_throughput-<date>.json bench/results/wire_cost-<date>.json
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import MISSING, asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

Mode = Literal["push", "pull"]
COSTS_FILE = "capacity_costs.json"
DEFAULT_UTILISATION = 0.5
"""Plan api cores to run at half their measured capacity: room for bursts, log uploads and changes."""

_UNITS = {"s": 1, "m": 60, "h": 3600}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """`300`, `300s`, `5m`, `1.5h` -> seconds; ValueError for anything else or for zero."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 300s, 5m or 1h)")
    seconds = float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    if seconds <= 0:
        raise ValueError(f"the heartbeat interval must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True)
class Costs:
    """What the benchmarks measured, per unit of work."""

    measured_on: str
    machine: str
    source: str
    heartbeats_per_core_s: float
    heartbeat_up_ip_bytes: float  # an unchanged heartbeat, agent -> manager, TCP/IP headers included
    heartbeat_down_ip_bytes: float
    heartbeat_http_bytes: float  # the same, HTTP bytes only (request + response)
    changed_heartbeat_down_ip_bytes: float  # a heartbeat that brings the new document
    keepalive_ip_bytes_per_hour: float  # one idle push agent's MQTT keep-alives, both directions
    keepalive_s: int
    publish_ip_bytes: float  # the retained PUBLISH of a new document to one agent, and its PUBACK
    envelope_bytes: int  # the signed document those were measured with
    # how `heartbeats_per_core_s` was measured: "new-tls" (a new connection and a full TLS handshake per
    # heartbeat, as agents heartbeating every few minutes do) or "keep-alive" (connections reused)
    heartbeat_connection: str = "keep-alive"
    connection_up_ip_bytes: float = 0.0  # a new connection's TCP + TLS handshakes (and close), per side,
    connection_down_ip_bytes: float = 0.0  # added to every heartbeat with "new-tls"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Costs:
        fields = cls.__dataclass_fields__
        return cls(**{name: data[name] for name in fields if name in data or _required(fields[name])})


def _required(field: Any) -> bool:
    return field.default is MISSING and field.default_factory is MISSING


@cache
def measured_costs() -> Costs:
    """The costs shipped with the package."""
    text = resources.files("api").joinpath(COSTS_FILE).read_text()
    return Costs.from_dict(json.loads(text))


@dataclass(frozen=True)
class Plan:
    agents: int
    mode: Mode
    heartbeat_s: float
    utilisation: float
    heartbeats_per_s: float
    api_cores: int
    api_cores_exact: float
    broker_connections: int
    steady_up_bytes_per_s: float  # agents -> manager and broker
    steady_down_bytes_per_s: float
    steady_bits_per_s: float
    bytes_per_day: float
    change_bytes: float  # one policy change reaching every agent
    change_seconds: float  # how long that takes to reach them all (push: at once)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(
    agents: int,
    mode: Mode,
    heartbeat_s: float,
    *,
    costs: Costs | None = None,
    utilisation: float = DEFAULT_UTILISATION,
) -> Plan:
    """The steady load of `agents` agents heartbeating every `heartbeat_s` seconds, and one change."""
    if agents < 0:
        raise ValueError("the number of agents cannot be negative")
    if heartbeat_s <= 0:
        raise ValueError("the heartbeat interval must be positive")
    if not 0 < utilisation <= 1:
        raise ValueError("utilisation must be in (0, 1]")
    if mode not in ("push", "pull"):
        raise ValueError(f"mode must be push or pull, got {mode!r}")
    c = costs or measured_costs()
    rate = agents / heartbeat_s
    up = rate * (c.heartbeat_up_ip_bytes + c.connection_up_ip_bytes)
    down = rate * (c.heartbeat_down_ip_bytes + c.connection_down_ip_bytes)
    if mode == "push":
        keepalive = agents * c.keepalive_ip_bytes_per_hour / 3600
        up += keepalive / 2
        down += keepalive / 2
        change_bytes = agents * c.publish_ip_bytes
        change_seconds = 0.0
    else:
        change_bytes = agents * (c.changed_heartbeat_down_ip_bytes - c.heartbeat_down_ip_bytes)
        change_seconds = heartbeat_s
    exact = rate / c.heartbeats_per_core_s / utilisation
    return Plan(
        agents=agents,
        mode=mode,
        heartbeat_s=heartbeat_s,
        utilisation=utilisation,
        heartbeats_per_s=rate,
        api_cores=max(1, math.ceil(exact)) if agents else 0,
        api_cores_exact=exact,
        broker_connections=agents if mode == "push" else 0,
        steady_up_bytes_per_s=up,
        steady_down_bytes_per_s=down,
        steady_bits_per_s=(up + down) * 8,
        bytes_per_day=(up + down) * 86_400,
        change_bytes=change_bytes,
        change_seconds=change_seconds,
    )


_CONNECTION = {
    "new-tls": "each on a new TLS connection",
    "keep-alive": "on kept-alive connections",
}


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def human_bits(bits_per_s: float) -> str:
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if abs(bits_per_s) < 1000 or unit == "Gbit/s":
            return f"{bits_per_s:,.1f} {unit}"
        bits_per_s /= 1000
    raise AssertionError("unreachable")


def describe(result: Plan, costs: Costs) -> list[tuple[str, str]]:
    """The plan as (what, how much) lines for people."""
    lines = [
        ("agents", f"{result.agents:,} in {result.mode} mode, heartbeat every {result.heartbeat_s:g} s"),
        ("request rate", f"{result.heartbeats_per_s:,.1f} heartbeats/s"),
        (
            "api cores",
            f"{result.api_cores} ({result.api_cores_exact:.2f} at {result.utilisation:.0%} of "
            f"{costs.heartbeats_per_core_s:,.0f} heartbeats/s per core, "
            f"{_CONNECTION.get(costs.heartbeat_connection, costs.heartbeat_connection)})",
        ),
        (
            "agents per api core",
            f"{costs.heartbeats_per_core_s * result.heartbeat_s:,.0f} at this interval (at full load)",
        ),
        ("broker connections", f"{result.broker_connections:,}"),
        (
            "bandwidth, steady",
            f"{human_bits(result.steady_bits_per_s)} "
            f"(up {human_bits(result.steady_up_bytes_per_s * 8)}, "
            f"down {human_bits(result.steady_down_bytes_per_s * 8)}); "
            f"{human_bytes(result.bytes_per_day)}/day",
        ),
    ]
    if result.mode == "push":
        change = f"{human_bytes(result.change_bytes)} published at once (retained PUBLISH + PUBACK per agent)"
    else:
        change = (
            f"{human_bytes(result.change_bytes)} more than unchanged heartbeats, "
            f"over one interval ({result.change_seconds:g} s)"
        )
    lines.append(("one policy change", change))
    lines.append(("costs measured", f"{costs.measured_on} on {costs.machine}"))
    return lines


def costs_from_results(throughput: dict[str, Any], wire: dict[str, Any]) -> dict[str, Any]:
    """The contents of `capacity_costs.json`, from a benchmark 2 and a benchmark 3 result.

    Over TLS, benchmark 3's `app_bytes` are TLS record bytes (TCP payload): the HTTP bytes inside are
    `http_bytes.total`; results from before TLS have only `app_bytes`, which are HTTP bytes there. The
    heartbeat rate is benchmark 2's cold TLS rate (a new connection per heartbeat) when it has one; then
    each heartbeat also pays benchmark 3's HTTPS connection bytes."""
    header = 52  # IPv4 20 + TCP 20 + timestamps 12, as in bench.wire_cost
    unchanged = wire["pull"]["unchanged_heartbeat"]
    changed = wire["pull"]["changed_heartbeat"]
    push = wire["push"]
    machine = throughput["machine"]
    http_bytes = unchanged.get("http_bytes")
    cold_rate = throughput["summary"].get("cold_tls_heartbeat_rps_per_core")
    connection = wire["pull"].get("connection") if cold_rate else None
    per_connection = {}
    if connection and connection.get("tls"):
        per_connection = {
            "connection_up_ip_bytes": connection["app_bytes_out"] + connection["segments_out"] * header,
            "connection_down_ip_bytes": connection["app_bytes_in"] + connection["segments_in"] * header,
        }
    return {
        "measured_on": throughput["date"][:10],
        "machine": f"{machine.get('cpu', '?')}, {machine.get('cores') or machine.get('cpus')} cores, "
        f"Python {machine.get('python', '?')}",
        "source": f"bench/results: {throughput['name']} {throughput['date']}, {wire['name']} {wire['date']}",
        "heartbeats_per_core_s": cold_rate or throughput["summary"]["heartbeat_rps_per_core"],
        "heartbeat_connection": "new-tls" if cold_rate else "keep-alive",
        "heartbeat_up_ip_bytes": unchanged["app_bytes_out"] + unchanged["segments_out"] * header,
        "heartbeat_down_ip_bytes": unchanged["app_bytes_in"] + unchanged["segments_in"] * header,
        "heartbeat_http_bytes": http_bytes["total"] if http_bytes else unchanged["app_bytes"],
        "changed_heartbeat_down_ip_bytes": changed["app_bytes_in"] + changed["segments_in"] * header,
        "keepalive_ip_bytes_per_hour": push["idle_per_agent_per_hour"]["ip_bytes"],
        "keepalive_s": push["idle_per_agent_per_hour"]["keepalive_s"],
        "publish_ip_bytes": push["policy_change"]["ip_bytes"],
        "envelope_bytes": push["envelope_bytes"],
        **per_connection,
    }


def main(argv: list[str]) -> None:
    """`python -m api.capacity THROUGHPUT.json WIRE.json`: rewrite the shipped costs from results."""
    if len(argv) != 2:
        sys.exit("usage: python -m api.capacity heartbeat_throughput-<date>.json wire_cost-<date>.json")
    throughput, wire = (json.loads(Path(name).read_text()) for name in argv)
    costs = costs_from_results(throughput, wire)
    costs["source"] = ", ".join(f"bench/results/{Path(name).name}" for name in argv)
    target = Path(__file__).with_name(COSTS_FILE)
    target.write_text(json.dumps(costs, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
