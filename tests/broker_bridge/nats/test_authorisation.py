"""What an agent's JWT lets it do on a real 3-node NATS cluster, and what the cluster refuses.

One cluster for the module (`nats_cluster`); each test uses its own agent ids and groups.
"""

from __future__ import annotations

import secrets
import time

import pytest

from broker_bridge.nats import credentials
from broker_bridge.nats.keys import NatsKeys
from fabric_core.topics import all_states_filter, cmd_topic, config_topic, state_topic
from tests.support.broker import Inbox
from tests.support.nats import NatsCluster

pytestmark = pytest.mark.cluster

REFUSED_SUBACK = 0x80


def new_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def test_the_cluster_forms_quickly(nats_cluster: NatsCluster) -> None:
    print(f"3-node cluster ready (healthy, JetStream meta leader) in {nats_cluster.started_in_s:.2f}s")
    assert nats_cluster.started_in_s < 30


def test_an_agent_reads_its_groups_retained_config_from_any_node_and_its_cmd_topic(
    nats_cluster: NatsCluster,
) -> None:
    prefix = nats_cluster.prefix
    group = 100 + secrets.randbelow(10_000)
    bridge = nats_cluster.link(node=0)
    topic = config_topic(prefix, group, 7)
    bridge.publish(topic, b"document-1", qos=1, retain=True)
    for node in (1, 2):
        agent_id = new_id(f"reader{node}")
        agent = nats_cluster.agent(agent_id, group, node=node)
        assert agent.subscribe(topic, qos=0).value == 0
        got = agent.expect(topic, timeout=10)
        assert (got.payload, got.retain) == (b"document-1", True)
        assert agent.subscribe(cmd_topic(prefix, agent_id), qos=0).value == 0
        # From the agent's node: a SUBACK does not mean the other nodes know of the subscription yet
        # (interest crosses the routes asynchronously; a QoS 0 command sent meanwhile is lost, which
        # is why commands are re-sent until the agent shows it acted).
        nats_cluster.link(node=node).publish(cmd_topic(prefix, agent_id), b"update-now", qos=1)
        assert agent.expect(cmd_topic(prefix, agent_id)).payload == b"update-now"


def test_an_agent_publishes_its_retained_state_at_qos_1_and_the_bridge_reads_it(
    nats_cluster: NatsCluster,
) -> None:
    prefix = nats_cluster.prefix
    inbox = Inbox()
    bridge = nats_cluster.link(node=2)
    bridge.subscribe(
        all_states_filter(prefix), inbox, qos=1
    )  # the bridge's subscription, as service.py makes it
    agent_id = new_id("stater")
    agent = nats_cluster.agent(agent_id, 1, node=0)
    assert not agent.publish(state_topic(prefix, agent_id), b'{"serial":1}', retain=True).is_failure
    inbox.wait_for(state_topic(prefix, agent_id), b'{"serial":1}', timeout=10)


def test_an_agent_may_not_read_other_groups_everything_or_other_agents_cmd(nats_cluster: NatsCluster) -> None:
    prefix = nats_cluster.prefix
    agent = nats_cluster.agent(new_id("nosy"), 5, node=1)
    for refused in (
        config_topic(prefix, 6, 1),
        f"{prefix}/v1/config/#",
        "#",
        cmd_topic(prefix, "someone-else"),
        state_topic(prefix, "someone-else"),
    ):
        assert agent.subscribe(refused, qos=0).value == REFUSED_SUBACK, refused


def test_an_agent_cannot_publish_a_config_document_or_another_agents_state(nats_cluster: NatsCluster) -> None:
    prefix = nats_cluster.prefix
    group = 200 + secrets.randbelow(10_000)
    topic = config_topic(prefix, group, 1)
    forger = nats_cluster.agent(new_id("forger"), group, node=0)
    reader = nats_cluster.agent(new_id("reader"), group, node=0)
    assert reader.subscribe(topic, qos=0).value == 0
    forger.publish(topic, b"forged", retain=True)  # dropped by the broker; the connection stays
    forger.publish(state_topic(prefix, "victim"), b"forged")
    assert nats_cluster.received_before_marker(reader, topic, node=0) == []
    late = nats_cluster.agent(new_id("late"), group, node=2)
    late.subscribe(topic, qos=0)
    assert nats_cluster.received_before_marker(late, topic, node=2) == []  # nothing was retained either


def test_expired_forged_and_foreign_jwts_are_refused_at_connect(nats_cluster: NatsCluster) -> None:
    prefix, keys = nats_cluster.prefix, nats_cluster.engine.keys
    agent_id = new_id("refused")
    expired = credentials.agent_jwt(
        keys, prefix=prefix, agent_id=agent_id, group_id=1, expires=int(time.time()) - 5
    )
    good = credentials.agent_jwt(
        keys, prefix=prefix, agent_id=agent_id, group_id=1, expires=credentials.expiry(600)
    )
    head, body, signature = good.split(".")
    tampered = f"{head}.{body}.{signature[:8]}{'A' if signature[8] != 'A' else 'B'}{signature[9:]}"
    other = NatsKeys.generate()  # another operator and account altogether
    foreign = credentials.agent_jwt(
        other, prefix=prefix, agent_id=agent_id, group_id=1, expires=credentials.expiry(600)
    )
    for name, token in (("expired", expired), ("tampered", tampered), ("foreign", foreign)):
        client = nats_cluster.client(agent_id, token, agent_id, node=1)
        reason = _connack(client)
        assert reason is None or reason.is_failure, f"the {name} JWT was accepted"
    assert not nats_cluster.client(agent_id, good, agent_id, node=1).connect().is_failure


def test_the_bridge_credentials_work_over_mqtt_3_1_1_with_failover_addresses(
    nats_cluster: NatsCluster,
) -> None:
    prefix = nats_cluster.prefix
    link = nats_cluster.link()  # every node's address: it connects to one of them
    assert link.protocol == "3.1.1" and link.address in nats_cluster.addresses
    inbox = Inbox()
    topic = config_topic(prefix, 9, 9)
    link.subscribe(topic, inbox, qos=0)
    link.publish(topic, b"to-myself", qos=1, retain=True)
    inbox.wait_for(topic, b"to-myself")


def _connack(client):  # type: ignore[no-untyped-def]
    """The CONNACK reason, or None when the broker closed the connection without one."""
    try:
        return client.connect(timeout=5)
    except AssertionError:
        return None
