"""What a benchmark waits for, and the times it reads: convergence, a fan-out, sessions coming back.

Each wait runs until every agent concerned meets its condition or the time is up, and answers with how
many did and percentiles of how long they took (from a given wall-clock `since`), for the control
protocol (`agent_stub.simulator.control`):

- `wait_converged`: every agent holds the current serial of its (group, location), or a later one;
- `wait_messages`: every push agent handled a config message (a bare baseline's fan-out);
- `wait_sessions`: every push agent has a session that came up again (and holds its expected serial).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from agent_stub.measure import percentiles
from agent_stub.simulator.agents import AnyAgent, BareAgent
from agent_stub.simulator.fleet import Predicate, SimulatedFleet
from agent_stub.simulator.plan import DocumentKey, key_text


async def wait_converged(
    fleet: SimulatedFleet, serials: dict[DocumentKey, int] | None, *, since: float | None, timeout_s: float
) -> dict[str, Any]:
    """Until every agent holds the current serial of its (group, location) or a later one.

    `serials`: the expected serials (else asked of the manager, and asked again while waiting, so
    that agents that move location are judged by their new location's document). Latencies are
    measured from `since` to the moment each agent first applied its expected serial.
    """
    began = time.monotonic()
    fixed = serials is not None
    expected = serials if serials is not None else await fleet.current_serials()

    async def refresh() -> Predicate | None:
        if fixed:
            return None
        expected.update(await fleet.current_serials())
        return fleet.converged(expected)

    wait = await fleet.wait_for(fleet.agents, fleet.converged(expected), timeout_s, recheck=refresh)
    latencies: list[float] = []
    by_key: dict[str, list[float]] = defaultdict(list)
    if since is not None:
        for agent in fleet.agents:
            key = agent.key
            at = agent.applied_at(expected[key]) if key in expected and key is not None else None
            if at is not None and key is not None and agent.index not in wait.pending:
                latencies.append(at - since)
                by_key[key_text(key)].append(at - since)
    return {
        "ok": wait.done.is_set(),
        "agents": len(fleet.agents),
        "converged": len(fleet.agents) - len(wait.pending),
        "expected_serials": {key_text(k): v for k, v in sorted(expected.items())},
        "latency_s": percentiles(latencies) if since is not None else None,
        "latency_by_key_s": {k: [round(min(v), 3), round(max(v), 3)] for k, v in sorted(by_key.items())},
        "waited_s": round(time.monotonic() - began, 3),
    }


async def wait_messages(fleet: SimulatedFleet, *, since: float, timeout_s: float) -> dict[str, Any]:
    """Until every push agent has handled a config message after `since` (a baseline's fan-out)."""
    began = time.monotonic()
    push = [agent for agent in fleet.agents if agent.mode == "push"]
    wait = await fleet.wait_for(push, lambda agent: agent.config_at >= since, timeout_s)
    latencies = [agent.config_at - since for agent in push if agent.config_at >= since]
    return {
        "ok": wait.done.is_set(),
        "agents": len(push),
        "received": len(push) - len(wait.pending),
        "latency_s": percentiles(latencies),
        "waited_s": round(time.monotonic() - began, 3),
    }


async def wait_sessions(
    fleet: SimulatedFleet, *, since: float, timeout_s: float, serials: dict[DocumentKey, int] | None = None
) -> dict[str, Any]:
    """Until every push agent has a session that came up after `since` and, with `serials`, holds
    its expected serial. Times run from `since` to the later of both, per agent."""
    began = time.monotonic()
    push = [agent for agent in fleet.agents if agent.mode == "push"]
    holds = fleet.converged(serials) if serials is not None else (lambda agent: True)

    def back(agent: AnyAgent) -> bool:
        if isinstance(agent, BareAgent):  # no serial to hold: the session is all
            return agent.push_session and agent.session_at >= since
        return agent.push_session and agent.session_at >= since and holds(agent)

    wait = await fleet.wait_for(push, back, timeout_s)
    stuck = [
        {
            "index": agent.index,
            "transport": agent.transport,
            "session_at": agent.session_at,
            "config_at": agent.config_at,
            "key": key_text(agent.key) if agent.key else None,
            "serial": agent.serial,
        }
        for agent in push
        if agent.index in wait.pending
    ][:5]
    times: list[float] = []
    sessions: list[float] = []  # the session alone, and the serial alone: which one kept an agent
    serials_at: list[float] = []
    for agent in push:
        if agent.index in wait.pending:
            continue
        at = agent.session_at
        sessions.append(at - since)
        key = agent.key
        if serials is not None and key is not None and not isinstance(agent, BareAgent):
            applied = agent.applied_at(serials[key])
            held_since = applied if applied is not None else since
            serials_at.append(held_since - since)
            at = max(at, held_since)
        times.append(at - since)
    return {
        "ok": wait.done.is_set(),
        "agents": len(push),
        "back": len(push) - len(wait.pending),
        "time_s": percentiles(times),
        "session_s": percentiles(sessions),
        "serial_s": percentiles(serials_at) if serials_at else None,
        "not_back_sample": stuck,
        "config_message_since": sum(1 for agent in push if agent.config_at >= since),
        "waited_s": round(time.monotonic() - began, 3),
    }
