"""Benchmark 4, reconnect storm: the broker restarts under a fleet of push agents.

A fleet of push agents (2,000 by default, 10,000 with `--full`) with their sessions up. The broker is
stopped (SIGTERM: it saves its sessions and retained documents), an operator edits the root's policy
while it is away (so "back" means back on the new serial, which the bridge cannot publish yet), and the
broker is started again (`OUTAGES_S`). Measured from the moment the broker is started again (it
listens within `broker_start_s`, reported):

- the time until every agent has its push session up again and holds the new serial (p50, p99, all);
- the heartbeats the manager received per second, from the stop until all are back: agents fall back
  to pull while the broker is away (heartbeats at their interval, spread by the manager's jitter);
  those that heartbeated meanwhile (the manager last heard "pull" from them) report their new session
  with one heartbeat when it comes back, the others need not;
- the MQTT connects per second the fleet made (paced by the simulator's token bucket, with jitter:
  Mosquitto's listen backlog is about 100).

Baseline, in the same run: the same broker accounts and topics as bare MQTT clients (`simulate --bare`:
the same `MqttLink`, pacer and back-off, no agent logic: no verification, state report or heartbeat),
through the same restarts; back = session up again (CONNACK and both SUBACKs).

Two storms each: a restart (the broker started again as soon as it has stopped) and an outage of a few
seconds, during which agents fall back to pull and their reconnect back-off grows.

Target (issue [4/4]): all back within 10 s.

On NATS (`--engine nats --broker-nodes 3`, issue [3/6]) the storm is a node lost, not a broker restarted:
one node of the cluster (`KILLED_NODE`) is killed (SIGKILL, `BrokerCluster.kill`: a crash, nothing
saved), the operator edits the root's policy at once, and the agents that were on that node reconnect to
the others (every agent has every node's URL and picks at random, failing over). Measured from the kill:

- until every agent has a push session again (the killed node's agents on another node; the others
  never lost theirs): the last reconnect, and p50/p99 of the reconnects;
- until every agent holds the document of the change made during the outage (QoS 0 on NATS: what a
  JetStream election loses, the bridge's anti-entropy republishes or nudges);
- then the node is restarted (`BrokerCluster.restart`) and its rejoining reported: how long until it is
  healthy and knows the JetStream meta leader, and that it takes a new connection.

Baseline, same run: bare MQTT 3.1.1 clients (`simulate --bare`) through the same kill, back = session up.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.console import say
from bench.fleet import SimulatorProcess, fleet_size, size_note
from bench.meters import CpuMeter, ManagerProbe
from bench.results import machine, ratio
from bench.stack import Stack, broker_command, broker_of, kept_stack, wait_until

NAME = "reconnect_storm"
OUTAGES_S = (0.0, 5.0)
"""A restart (stop, start at once) and an outage of a few seconds (agents fall back to pull meanwhile)."""
TARGET_S = 10.0
CONNECT_RATE = 1000.0
BACK_TIMEOUT_S = 600.0
KILLED_NODE = 1
"""The node a NATS storm kills (the second of three: nothing singles it out)."""
POLL_S = 0.5


def run(args: argparse.Namespace) -> dict[str, Any]:
    if broker_of(args)[0] == "nats":
        return run_node_kill(args)
    return run_restart(args)


def run_restart(args: argparse.Namespace) -> dict[str, Any]:
    """Mosquitto: the broker stopped and started again under the fleet (a restart and an outage)."""
    agents = fleet_size(args)
    rate = float(getattr(args, "connect_rate", None) or CONNECT_RATE)
    storms: dict[str, dict[str, Any]] = {}
    with kept_stack(args) as stack:
        transport = stack.transport
        policy = stack.ensure_root_policy()
        for kind, policy_id in (("agents", policy["id"]), ("bare_mqtt_baseline", None)):
            extra = ["--bare"] if policy_id is None else []
            with SimulatorProcess(stack, agents, connect_rate=rate, extra=extra) as fleet:
                for outage in OUTAGES_S:
                    storms[f"{kind}_outage_{outage:g}s"] = _storm(stack, fleet, outage, policy_id=policy_id)
                setup = fleet.setup
            storms[f"{kind}_setup"] = setup
    scenarios = {}
    for outage in OUTAGES_S:
        agent_storm = storms[f"agents_outage_{outage:g}s"]
        bare_storm = storms[f"bare_mqtt_baseline_outage_{outage:g}s"]
        back_s = agent_storm["back_s"].get("max")
        scenarios[f"outage_{outage:g}s"] = {
            "agents_all_back_s": back_s,
            "agents_back_p50_s": agent_storm["back_s"].get("p50"),
            "agents_back_p99_s": agent_storm["back_s"].get("p99"),
            "bare_all_back_s": bare_storm["back_s"].get("max"),
            "ratio_all_back": ratio(back_s, bare_storm["back_s"].get("max")),
            "manager_heartbeats_peak_per_s": agent_storm["manager_heartbeats"]["peak_per_s"],
            "manager_heartbeats_peak_during_outage_per_s": agent_storm["manager_heartbeats"][
                "during_outage_peak_per_s"
            ],
            "connects_peak_per_s": agent_storm["simulator_rates"]["connects_peak_per_s"],
            "all_back_and_converged": agent_storm["all_back"],
            "met_10s": agent_storm["all_back"] and back_s is not None and back_s <= TARGET_S,
        }
    result: dict[str, Any] = {
        "name": NAME,
        "agents": agents,
        "connect_rate_per_s": rate,
        "scenarios": scenarios,
        "storms": storms,
        "targets": {"all_back_s": TARGET_S},
        "met": {name: scenario["met_10s"] for name, scenario in scenarios.items()},
        "command": f"python -m bench --only {NAME} --agents {agents}"
        + (f" --connect-rate {rate:g}" if getattr(args, "connect_rate", None) else ""),
        "machine": machine(),
        "transport": transport,
        "notes": (
            "Times from the command that started the broker again (wall clock), to each agent's session "
            "being up and, for agents, holding the serial of the change made while the broker was down. "
            "Heartbeats counted by the manager (ASGI middleware), per wall-clock second. Outage 0 s: "
            "the broker is started again as soon as it has stopped."
        ),
    }
    result["notes"] += size_note(args, agents)
    return result


def _storm(
    stack: Stack, fleet: SimulatorProcess, outage_s: float, *, policy_id: int | None
) -> dict[str, Any]:
    bare = policy_id is None
    agents = fleet.agents
    assert stack.broker is not None and stack.counter is not None
    keys = fleet.keys()
    if not bare:
        steady = fleet.control.request("wait_converged", timeout_s=120)
        if not steady["ok"]:
            raise RuntimeError(f"the fleet did not converge before the storm: {steady}")
    fleet.wait_quiet()
    before = stack.current_serials(keys)
    say(f"stopping the broker for {outage_s:g}s ({'bare clients' if bare else 'agents'})")
    meter = CpuMeter(stack, fleet.control)
    probe = ManagerProbe(stack.url, verify=stack.verify).__enter__()
    stopping = time.time()
    stack.broker.process.stop()
    stopped = time.time()
    changed_at = None
    if policy_id is not None:
        changed_at, _ = stack.change_policy(policy_id)
    time.sleep(max(0.0, stopping + outage_s - time.time()))
    restarting = time.time()
    stack.broker.process.start()
    listening = time.time()
    newer = None if bare else {key: serial + 1 for key, serial in before.items()}
    limit = min(BACK_TIMEOUT_S, 60 + agents / 20)
    # From the restart command: a fast agent may connect between the broker's listen() and this process
    # noticing it (its session would otherwise seem to predate the restart).
    back = fleet.control.request("wait_sessions", since=restarting, serials=newer, timeout_s=limit)
    # Agents whose last heartbeat said "pull" (they heartbeated while the broker was away) report their
    # new session with one heartbeat; the others stay quiet. Counted until the manager is quiet again.
    fleet.wait_quiet()
    settled = time.time()
    cpu = meter.read()
    probe.__exit__(None, None, None)
    heartbeats = stack.counter.window(stopping, settled)
    during_outage = stack.counter.window(stopped, listening - 1)  # whole seconds while it was down
    rates = fleet.control.request("rates", since=stopping, until=settled)
    say(
        f"{'bare clients' if bare else 'agents'}: {back['back']}/{back['agents']} back, "
        f"all within {back['time_s'].get('max')}s; manager heartbeats peak {heartbeats['peak_per_s']}/s"
    )
    summary = fleet.control.request("summary", refresh=not bare)
    return {
        "agents": back["agents"],
        "back": back["back"],
        "all_back": bool(back["ok"]) and back["back"] == agents,
        "back_s": back["time_s"],
        "session_back_s": back.get("session_s"),
        "serial_applied_s": back.get("serial_s"),
        "not_back_sample": back.get("not_back_sample"),
        "config_message_received": back.get("config_message_since"),
        "broker_stop_s": round(stopped - stopping, 2),
        "broker_start_s": round(listening - restarting, 2),
        "change_during_outage_at_s": None if changed_at is None else round(changed_at - stopping, 2),
        "manager_heartbeats": {
            "peak_per_s": heartbeats["peak_per_s"],
            "total": heartbeats["total"],
            "during_outage_peak_per_s": during_outage["peak_per_s"],
            "during_outage_total": during_outage["total"],
            "per_s_from_stop": heartbeats["per_s"],
        },
        "simulator_rates": rates,
        "cpu_s_from_stop_until_quiet": cpu,
        "manager_probe": probe.result(),
        "converged_after": None if bare else summary.get("converged"),
    }


# --- NATS: one node of the cluster killed ---------------------------------------------------------------


def run_node_kill(args: argparse.Namespace) -> dict[str, Any]:
    agents = fleet_size(args)
    rate = float(getattr(args, "connect_rate", None) or CONNECT_RATE)
    storms: dict[str, dict[str, Any]] = {}
    with kept_stack(args) as stack:
        transport = stack.transport
        described = stack.broker_description
        policy = stack.ensure_root_policy()
        for kind, policy_id in (("agents", policy["id"]), ("bare_mqtt_baseline", None)):
            extra = ["--bare"] if policy_id is None else []
            with SimulatorProcess(stack, agents, connect_rate=rate, extra=extra) as fleet:
                storms[kind] = _node_kill(stack, fleet, KILLED_NODE, policy_id=policy_id)
                storms[kind]["setup"] = fleet.setup
    agent_storm, bare_storm = storms["agents"], storms["bare_mqtt_baseline"]
    connected_s = agent_storm["all_connected_s"]
    converged_s = agent_storm["all_hold_change_s"]
    bare_s = bare_storm["all_connected_s"]
    scenario = {
        "agents_all_connected_s": connected_s,
        "agents_all_hold_change_s": converged_s,
        "agents_reconnect_p50_s": agent_storm["reconnected_s"].get("p50"),
        "agents_reconnect_p99_s": agent_storm["reconnected_s"].get("p99"),
        "agents_reconnected": agent_storm["reconnected"],
        "bare_all_connected_s": bare_s,
        "bare_reconnected": bare_storm["reconnected"],
        "ratio_all_connected": ratio(connected_s, bare_s),
        "ratio_all_hold_change_to_bare_connected": ratio(converged_s, bare_s),
        "node_rejoined": agent_storm["restart"]["rejoined"] and bare_storm["restart"]["rejoined"],
        "node_rejoin_s": [agent_storm["restart"]["rejoin_s"], bare_storm["restart"]["rejoin_s"]],
        "all_back_and_converged": agent_storm["all_back"] and agent_storm["all_converged"],
        "met_10s": bool(agent_storm["all_back"] and agent_storm["all_converged"])
        and converged_s is not None
        and converged_s <= TARGET_S,
    }
    result: dict[str, Any] = {
        "name": NAME,
        "agents": agents,
        **described,
        "storm": f"node {KILLED_NODE} of {stack.nodes} killed (SIGKILL)",
        "connect_rate_per_s": rate,
        "scenarios": {"node_killed": scenario},
        "storms": storms,
        "targets": {"all_back_s": TARGET_S},
        "met": {"node_killed": scenario["met_10s"]},
        "command": f"python -m bench --only {NAME} --agents {agents}{broker_command(args)}"
        + (f" --connect-rate {rate:g}" if getattr(args, "connect_rate", None) else ""),
        "machine": machine(),
        "transport": transport,
        "notes": (
            "Times from the SIGKILL of one node (wall clock): all connected = the last agent that lost "
            "its session has one again on another node (the others never lost theirs); all hold the "
            "change = every agent holds the serial of the policy edit made right after the kill. The "
            "node is then restarted and must be healthy, know the JetStream meta leader and take a new "
            "connection."
        ),
    }
    result["notes"] += size_note(args, agents)
    return result


def _everyone_back(fleet: SimulatorProcess, *, killed: float, moved: int | None) -> bool:
    """Whether every agent has a session again after a node was killed at `killed` holding `moved`
    agents (polled for the end only; the times come from each agent's own session timestamp)."""
    if time.time() - killed < 1.0:
        return False
    sessions = fleet.control.request("summary", refresh=False)["push_sessions"]
    if sessions < fleet.agents:
        return False
    if not moved:
        return True
    # A fleet that has not noticed the kill yet still counts every session as up: until as many came
    # up again as the killed node held, not everyone is back.
    back = fleet.control.request("wait_sessions", since=killed, timeout_s=0)["back"]
    return bool(back >= moved)


def _node_kill(stack: Stack, fleet: SimulatorProcess, node: int, *, policy_id: int | None) -> dict[str, Any]:
    bare = policy_id is None
    agents = fleet.agents
    assert stack.broker is not None and stack.counter is not None
    cluster = stack.broker.cluster
    keys = fleet.keys()
    if not bare:
        steady = fleet.control.request("wait_converged", timeout_s=120)
        if not steady["ok"]:
            raise RuntimeError(f"the fleet did not converge before the storm: {steady}")
    fleet.wait_quiet()
    before = stack.current_serials(keys)
    per_node_before = stack.node_connections()
    say(
        f"killing node {node} ({'bare clients' if bare else 'agents'}); "
        f"connections per node {per_node_before}"
    )
    meter = CpuMeter(stack, fleet.control)
    probe = ManagerProbe(stack.url, verify=stack.verify).__enter__()
    killed = time.time()
    cluster.kill(node)
    changed_at = None
    if policy_id is not None:
        changed_at, _ = stack.change_policy(policy_id)
    limit = min(BACK_TIMEOUT_S, 60 + agents / 20)

    moved = per_node_before[node] if node < len(per_node_before) else None

    def everyone_connected() -> bool:
        return _everyone_back(fleet, killed=killed, moved=moved)

    try:
        wait_until(everyone_connected, timeout=limit, what="every agent connected again", interval=POLL_S)
    except TimeoutError as exc:
        say(f"[yellow]{exc}[/]")
    # the agents whose session came up after the kill: the killed node's, now elsewhere
    back = fleet.control.request("wait_sessions", since=killed, timeout_s=0.5)
    converged: dict[str, Any] | None = None
    if not bare:
        newer = {key: serial + 1 for key, serial in before.items()}
        converged = fleet.control.request("wait_converged", serials=newer, since=killed, timeout_s=limit)
    summary = fleet.control.request("summary", refresh=False)
    per_node_after = stack.node_connections()
    fleet.wait_quiet()
    settled = time.time()
    cpu = meter.read()
    probe.__exit__(None, None, None)
    heartbeats = stack.counter.window(killed, settled)
    rates = fleet.control.request("rates", since=killed, until=settled)
    restart = _restart(stack, node)
    reconnected = back["session_s"] or {}
    all_connected_s = reconnected.get("max") if summary["push_sessions"] >= agents else None
    hold = converged["latency_s"] if converged else None
    all_converged = bool(converged and converged["ok"] and converged["converged"] == agents)
    say(
        f"{'bare clients' if bare else 'agents'}: {back['back']} reconnected, all connected within "
        f"{all_connected_s}s"
        + ("" if bare else f", all hold the change within {hold and hold.get('max')}s")
        + f"; node {node} rejoined in {restart['rejoin_s']}s"
    )
    return {
        "agents": agents,
        "killed_node": node,
        "connections_per_node_before": per_node_before,
        "connections_per_node_after": per_node_after,
        "reconnected": back["back"],
        "push_sessions_after": summary["push_sessions"],
        "all_back": summary["push_sessions"] >= agents,
        "all_connected_s": all_connected_s,
        "reconnected_s": reconnected,
        "all_converged": all_converged if not bare else None,
        "all_hold_change_s": None if hold is None or not all_converged else hold.get("max"),
        "hold_change_s": hold,
        "converged": None if converged is None else converged["converged"],
        "change_after_kill_s": None if changed_at is None else round(changed_at - killed, 2),
        "manager_heartbeats": {"peak_per_s": heartbeats["peak_per_s"], "total": heartbeats["total"]},
        "simulator_rates": rates,
        "cpu_s_from_kill_until_quiet": cpu,
        "manager_probe": probe.result(),
        "mqtt": summary.get("mqtt"),
        "restart": restart,
    }


def _restart(stack: Stack, node: int) -> dict[str, Any]:
    """Start the killed node again: healthy and in the cluster (JetStream meta leader known), and a
    new connection to it (the bridge's credentials) works."""
    assert stack.broker is not None
    began = time.monotonic()
    try:
        stack.broker.cluster.restart(node, timeout=120)
    except Exception as exc:  # reported, not raised: the storm's figures stand
        return {"rejoined": False, "rejoin_s": None, "error": str(exc)}
    rejoin_s = round(time.monotonic() - began, 2)
    connected = False
    began = time.monotonic()
    try:
        link = stack.publisher(f"bench-rejoin-{node}", node=node, timeout=60)
        link.close()
        connected = True
    except Exception as exc:
        say(f"[yellow]no new connection to node {node} after its restart: {exc}[/]")
    return {
        "rejoined": connected,
        "rejoin_s": rejoin_s,
        "new_connection_s": round(time.monotonic() - began, 2) if connected else None,
        "connections_per_node": stack.node_connections(),
    }
