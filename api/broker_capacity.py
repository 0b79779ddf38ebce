"""What a push fleet costs its broker, per engine: `policycast plan --mode push --engine nats`.

The costs per engine come from the benchmarks (docs/performance.md: broker authorisation, memory per
agent, reconnect storm) and are stored beside this module in `broker_costs.json`, with where each
figure was measured:

- `rss_per_agent_bytes`: the broker's resident memory per connected, subscribed agent;
- `connects_per_s`: new agent connections one node accepts per second (a reconnect storm's pace);
- `authorise_per_s`: agents per second made able to connect (Mosquitto: accounts written; NATS: JWTs
  minted, nothing written to the broker), and whether that cost grows with the fleet;
- `max_nodes`: 1 for Mosquitto (no clustering); a NATS cluster has 3 nodes or more.

From these, for a fleet: the broker nodes, their memory, how long re-homing the agents of a lost node
takes (none can be re-homed on one Mosquitto: they wait for it to come back), and how long authorising
the whole fleet takes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

Engine = Literal["mosquitto", "nats"]
ENGINES: tuple[Engine, ...] = ("mosquitto", "nats")
COSTS_FILE = "broker_costs.json"
MIN_CLUSTER_NODES = 3
"""A NATS cluster's JetStream (retained documents) needs a quorum: 3 nodes survive the loss of one."""


@dataclass(frozen=True)
class BrokerCosts:
    engine: Engine
    source: str
    rss_per_agent_bytes: float
    connects_per_s: float
    authorise_per_s: float
    authorise_grows_with_fleet: bool
    """True: each account costs more the more there are (Mosquitto 2.0.11 rewrites its file per
    account), so `authorise_per_s` holds only near the fleet size it was measured at."""
    authorise_measured_at: int
    max_nodes: int | None
    """None: no limit."""


@cache
def broker_costs() -> dict[Engine, BrokerCosts]:
    """The costs shipped with the package, per engine."""
    data: dict[str, dict[str, Any]] = json.loads(resources.files("api").joinpath(COSTS_FILE).read_text())
    return {engine: BrokerCosts(engine=engine, **data[engine]) for engine in ENGINES}


@dataclass(frozen=True)
class BrokerPlan:
    engine: Engine
    nodes: int
    agents_per_node: float
    rss_bytes_per_node: float
    rehome_seconds: float | None
    """How long the agents of one lost node take to reconnect to the others; None: they cannot (one
    node: they wait for it to come back)."""
    authorise_seconds: float
    authorise_estimate_only: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def broker_plan(
    agents: int, engine: Engine, *, nodes: int | None = None, costs: BrokerCosts | None = None
) -> BrokerPlan:
    """The broker side of `agents` push agents on `engine` (NATS: `nodes`, default 3)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    c = costs or broker_costs()[engine]
    if nodes is None:
        nodes = 1 if c.max_nodes == 1 else MIN_CLUSTER_NODES
    if nodes < 1:
        raise ValueError("a broker has at least one node")
    if c.max_nodes is not None and nodes > c.max_nodes:
        raise ValueError(f"{engine} runs on at most {c.max_nodes} node(s); use --engine nats for a cluster")
    per_node = agents / nodes
    rehome = per_node / (c.connects_per_s * (nodes - 1)) if nodes > 1 else None
    estimate_only = c.authorise_grows_with_fleet and agents > c.authorise_measured_at
    authorise = agents / c.authorise_per_s
    if estimate_only:
        # Quadratic: the time per account grows with the accounts already there.
        authorise *= agents / c.authorise_measured_at
    return BrokerPlan(
        engine=engine,
        nodes=nodes,
        agents_per_node=per_node,
        rss_bytes_per_node=per_node * c.rss_per_agent_bytes,
        rehome_seconds=rehome,
        authorise_seconds=authorise,
        authorise_estimate_only=estimate_only,
    )


def describe_broker(result: BrokerPlan, costs: BrokerCosts) -> list[tuple[str, str]]:
    """The broker plan as (what, how much) lines for people."""
    name = "Mosquitto" if result.engine == "mosquitto" else "NATS"
    nodes = f"{result.nodes} node{'s' if result.nodes > 1 else ''}"
    memory = result.rss_bytes_per_node / 1e6
    lines = [
        (
            "broker",
            f"{name}, {nodes}: {result.agents_per_node:,.0f} agents and ≈ {memory:,.0f} MB per node "
            f"({costs.rss_per_agent_bytes / 1000:,.1f} KB per agent)",
        )
    ]
    if result.rehome_seconds is None:
        lines.append(("a broker node lost", "push stops until it is back (agents fall back to heartbeats)"))
    else:
        lines.append(
            (
                "a broker node lost",
                f"its agents reconnect to the other {result.nodes - 1} in ≈ {result.rehome_seconds:,.1f} s "
                f"({costs.connects_per_s:,.0f} connects/s per node)",
            )
        )
    how = "JWTs minted, nothing written to the broker" if result.engine == "nats" else "accounts written"
    estimate = (
        " (extrapolated: the cost per account grows with the fleet)" if result.authorise_estimate_only else ""
    )
    lines.append(("authorising the fleet", f"≈ {_duration(result.authorise_seconds)}, {how}{estimate}"))
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.0f} min"
    return f"{seconds / 3600:,.1f} h"
