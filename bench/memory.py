"""Benchmark 6, memory: resident memory per simulated agent, and of the broker per connection.

A fleet of push agents (2,000 by default, 10,000 with `--full`) is started and left to settle; then:

- the simulator's resident set size (RSS) after a garbage collection, minus its RSS before it built any
  agent (after its imports), divided by the number of agents: what one agent costs in the simulator
  (identity, `AgentCore` with its parsed document, runtime, paho client, log spool, timestamps);
- Mosquitto's RSS with every agent connected, minus its RSS before they connected (accounts and
  persistent sessions already loaded), divided by the number of connections; and its RSS minus that
  of an empty Mosquitto (only the bridge's account), divided by the accounts it holds;
- the manager process's RSS growth over the same time (manager and bridge share the benchmark's
  process: their caches of agents, the bridge's state ingest), divided by the number of agents.

Baseline, in the same run: the same broker accounts as bare MQTT clients (`simulate --bare`: an
`MqttLink` with its paho client, subscribed to the agent's topics, no agent logic), measured the same
way: the share of an agent's memory that is its MQTT client.

Per engine (`--engine mosquitto|nats`, issue [3/6]): on a NATS cluster the broker's figures are summed
over its nodes (`broker_per_connection_bytes`: the growth of all nodes' RSS over the connections the
fleet added) and given per node (each node's growth over the connections it took, from its monitoring
endpoint). NATS holds no per-agent account: its per-agent figure is its per-connection one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_stub.measure import rss_bytes
from bench.console import say
from bench.fleet import SimulatorProcess, fleet_size, size_note
from bench.results import machine, ratio
from bench.stack import Stack, broker_command, broker_of, kept_stack
from broker_bridge.engine import TlsListener
from broker_bridge.mosquitto.engine import MosquittoEngine
from fabric_core.settings import Settings
from fabric_core.tls import manager_tls
from local_stack.broker_process import BrokerProcess
from local_stack.manager import pick_port

NAME = "memory"


def run(args: argparse.Namespace) -> dict[str, Any]:
    if broker_of(args)[0] == "nats":
        return run_cluster(args)
    agents = fleet_size(args)
    with tempfile.TemporaryDirectory(prefix="policycast-bench-broker-") as scratch:
        empty = empty_broker_rss(Path(scratch))
    with kept_stack(args) as stack:
        stack.ensure_root_policy()
        full = _measure(stack, agents, bare=False)
        bare = _measure(stack, agents, bare=True)
        accounts = stack.accounts()
        transport = stack.transport
    result: dict[str, Any] = {
        "name": NAME,
        "agents": agents,
        "simulated_agent_bytes": full["simulator_per_agent_bytes"],
        "bare_mqtt_client_bytes": bare["simulator_per_agent_bytes"],
        "ratio_agent_to_bare_client": ratio(
            full["simulator_per_agent_bytes"], bare["simulator_per_agent_bytes"]
        ),
        "broker_per_connection_bytes": full["broker_per_connection_bytes"],
        "broker_per_agent_bytes": round((full["broker_rss_connected_bytes"] - empty) / accounts),
        "broker_rss_empty_bytes": empty,
        "broker_accounts_and_sessions": accounts,
        "manager_process_per_agent_bytes": full["manager_process_per_agent_bytes"],
        "agents_run": full,
        "bare_run": bare,
        "command": f"python -m bench --only {NAME} --agents {agents}",
        "machine": machine(),
        "transport": transport,
        "notes": (
            "RSS from /proc/<pid>/status. The broker holds every account and persistent session before "
            "the fleet connects (provisioned and kept from earlier runs): broker_per_connection_bytes is "
            "what connecting adds on top (Mosquitto reuses memory freed while loading its state, so it "
            "can be 0); broker_per_agent_bytes is its RSS with the fleet connected minus an empty "
            "broker's, divided by the accounts it holds (account, roles, session, connection)."
        ),
    }
    result["notes"] += size_note(args, agents)
    return result


def empty_broker_rss(directory: Path) -> int:
    """RSS of a Mosquitto with Policycast's configuration and no account but the bridge's."""
    settings = Settings(data_dir=directory, mqtt_password="unused-in-this-measurement")
    certificates = manager_tls(settings).issue_files(directory, "broker", settings.tls_name_list)
    tls = TlsListener.of(pick_port(0), certificates)
    launch = MosquittoEngine(settings, None).write_config(directory, bind="127.0.0.1", tls=tls)
    process = BrokerProcess(launch)
    process.start()
    try:
        time.sleep(1.0)
        return rss_bytes(process.pid or 0)
    finally:
        process.stop()


def _measure(stack: Stack, agents: int, *, bare: bool) -> dict[str, Any]:
    assert stack.broker_pid is not None
    fleet = SimulatorProcess(stack, agents, extra=["--bare"] if bare else [])
    fleet.enrol()
    stack.wait_quiet()
    broker_before = rss_bytes(stack.broker_pid)
    nodes_before = [rss_bytes(pid or 0) for pid in stack.broker_pids]
    connections_before = stack.node_mqtt_connections()
    manager_before = rss_bytes(os.getpid())
    try:
        ready = fleet.launch()
        fleet.wait_quiet()
        collected = fleet.control.request("collect")
        broker_after = rss_bytes(stack.broker_pid)
        nodes_after = [rss_bytes(pid or 0) for pid in stack.broker_pids]
        connections_after = stack.node_mqtt_connections()
        manager_after = rss_bytes(os.getpid())
        summary = fleet.control.request("summary", refresh=False)
    finally:
        fleet.stop()
    sim_start = summary["rss_bytes"]["start"]
    nodes = _nodes(stack, nodes_before, nodes_after, connections_before, connections_after)
    connected = summary["push_sessions"]
    measured = {
        "agents": agents,
        "push_sessions": connected,
        "simulator_rss_start_bytes": sim_start,
        "simulator_rss_ready_bytes": ready["rss_bytes"]["ready"],
        "simulator_rss_after_gc_bytes": collected["rss_bytes"],
        "simulator_per_agent_bytes": round((collected["rss_bytes"] - sim_start) / agents),
        "broker_rss_before_bytes": broker_before,
        "broker_rss_connected_bytes": broker_after,
        "broker_per_connection_bytes": round((broker_after - broker_before) / connected)
        if connected
        else None,
        "manager_process_rss_before_bytes": manager_before,
        "manager_process_rss_after_bytes": manager_after,
        "manager_process_per_agent_bytes": round((manager_after - manager_before) / agents),
    }
    if len(nodes) > 1:
        measured["broker_nodes"] = nodes
        measured["broker_rss_before_bytes"] = sum(nodes_before)
        measured["broker_rss_connected_bytes"] = sum(nodes_after)
        measured["broker_per_connection_bytes"] = (
            round((sum(nodes_after) - sum(nodes_before)) / connected) if connected else None
        )
    kind = "bare client" if bare else "agent"
    each = measured["simulator_per_agent_bytes"] / 1024
    broker = (measured["broker_per_connection_bytes"] or 0) / 1024
    say(f"{kind}: {each:.1f} KiB each in the simulator, broker {broker:.1f} KiB per connection")
    return measured


def _nodes(
    stack: Stack,
    before: list[int],
    after: list[int],
    connections_before: list[set[int] | None],
    connections_after: list[set[int] | None],
) -> list[dict[str, Any]]:
    """Each node's RSS before and with the fleet, and its growth per connection it took (the MQTT
    connections there with the fleet that were not there before: one that closed meanwhile, such as
    a probe's, takes nothing from the count)."""
    nodes = []
    for index, (rss_before, rss_after) in enumerate(zip(before, after, strict=True)):
        then = connections_before[index] if index < len(connections_before) else None
        now = connections_after[index] if index < len(connections_after) else None
        added = len(now - then) if now is not None and then is not None else None
        nodes.append(
            {
                "node": index,
                "rss_before_bytes": rss_before,
                "rss_connected_bytes": rss_after,
                "connections_added": added,
                "per_connection_bytes": round((rss_after - rss_before) / added) if added else None,
            }
        )
    return nodes


def run_cluster(args: argparse.Namespace) -> dict[str, Any]:
    """NATS: the same fleets on a cluster; the broker's figures summed over the nodes and per node."""
    agents = fleet_size(args)
    with kept_stack(args) as stack:
        stack.ensure_root_policy()
        described = stack.broker_description
        full = _measure(stack, agents, bare=False)
        bare = _measure(stack, agents, bare=True)
        transport = stack.transport
    result: dict[str, Any] = {
        "name": NAME,
        "agents": agents,
        **described,
        "simulated_agent_bytes": full["simulator_per_agent_bytes"],
        "bare_mqtt_client_bytes": bare["simulator_per_agent_bytes"],
        "ratio_agent_to_bare_client": ratio(
            full["simulator_per_agent_bytes"], bare["simulator_per_agent_bytes"]
        ),
        "broker_per_connection_bytes": full["broker_per_connection_bytes"],
        "broker_per_agent_bytes": full["broker_per_connection_bytes"],
        "broker_per_connection_bytes_bare": bare["broker_per_connection_bytes"],
        "broker_per_connection_bytes_by_node": [n["per_connection_bytes"] for n in full["broker_nodes"]],
        "broker_rss_before_bytes": full["broker_rss_before_bytes"],
        "broker_rss_connected_bytes": full["broker_rss_connected_bytes"],
        "manager_process_per_agent_bytes": full["manager_process_per_agent_bytes"],
        "agents_run": full,
        "bare_run": bare,
        "command": f"python -m bench --only {NAME} --agents {agents}{broker_command(args)}",
        "machine": machine(),
        "transport": transport,
        "notes": (
            "RSS from /proc/<pid>/status of every nats-server node. broker_per_connection_bytes: the "
            "nodes' summed RSS with the fleet connected (each agent subscribed to its config and cmd "
            "topics, QoS 0, clean session) minus before it connected (the cluster up, JetStream's MQTT "
            "streams made, the bridge connected), over the connections; per node: that node's growth over "
            "the connections it took. No per-agent state is held by NATS beyond the connection."
        ),
    }
    result["notes"] += size_note(args, agents)
    return result
