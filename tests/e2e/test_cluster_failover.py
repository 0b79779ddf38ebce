"""A NATS cluster losing a node: real agents, a real 3-node cluster, `policycast serve` and `bridge`.

kill -9 of the node with the most agents, right after an operator change: every agent converges
within 30 s (its agents reconnect to the other nodes; anti-entropy repairs what the kill lost), a
change made while the node is down reaches everyone too, and the restarted node rejoins and serves
again. The agents' heartbeats are an hour away: nothing here converges by heartbeat.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.e2e.conftest import PushStack
from tests.support.engines import NatsBroker
from tests.support.processes import AgentProcess
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.parametrize("push_broker", ["nats"], indirect=True)]

CONVERGE_S = 30.0
AGENTS = 5


def agents_per_node(broker: NatsBroker, agent_ids: set[str]) -> list[int]:
    """How many of the agents each node holds a connection of (its monitoring endpoint's /connz)."""
    counts = []
    for launch, node in zip(broker.nats.cluster.launches, broker.nats.cluster.nodes, strict=True):
        if not node.running:
            counts.append(0)
            continue
        with urllib.request.urlopen(f"{launch.monitor_url}/connz?limit=1024", timeout=5) as answer:
            connections = json.loads(answer.read())["connections"] or []
        counts.append(sum(1 for c in connections if c.get("mqtt_client") in agent_ids))
    return counts


def converge(push_stack: PushStack, agents: list[AgentProcess], serial: int, what: str) -> None:
    for agent in agents:
        wait_for(
            agent.applied,
            until=lambda d: d is not None and d["serial"] == serial,
            timeout=CONVERGE_S,
            what=lambda agent=agent: f"{what}: serial {serial} at {agent.agent_id}\n{agent.output()}",
        )


def test_killing_a_node_during_a_change_loses_nothing_and_the_node_rejoins(push_stack: PushStack) -> None:
    broker = push_stack.broker
    assert isinstance(broker, NatsBroker)
    root = push_stack.manager.root()
    push_stack.manager.admin.communication(root, mode="push", heartbeat_s=3600)
    agents = [push_stack.agent(f"roamer-{i}", root) for i in range(AGENTS)]
    try:
        for agent in agents:
            push_stack.wait_transport(agent, "push", timeout=20)
        ids = {agent.agent_id for agent in agents}
        counts = wait_for(
            lambda: agents_per_node(broker, ids),
            until=lambda c: sum(c) == AGENTS,
            timeout=10,
            what="every agent's connection on a node",
        )
        victim = max(range(len(counts)), key=lambda i: counts[i])

        during_kill = push_stack.change(root, {"default": "deny"})
        broker.nats.cluster.kill(victim)
        converge(push_stack, agents, during_kill, f"after node {victim} was killed")
        assert agents_per_node(broker, ids)[victim] == 0

        while_down = push_stack.change(root, {"default": "allow"})
        converge(push_stack, agents, while_down, f"while node {victim} is down")

        broker.nats.cluster.restart(victim)  # waits until it is back in the cluster
        rejoined = push_stack.change(root, {"default": "deny", "after": "rejoin"})
        converge(push_stack, agents, rejoined, f"after node {victim} rejoined")
        on_it = broker.client("probe", broker.provision("probe", root), node=victim)
        assert not on_it.connect().is_failure, "the restarted node takes connections again"
        on_it.close()
    finally:
        for agent in agents:
            assert agent.stop() == 0, agent.output()
