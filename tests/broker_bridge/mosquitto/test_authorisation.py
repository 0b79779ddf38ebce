"""What the broker lets each account do, with real MQTT 5 clients reading reason codes.

An agent may read its own group's config topics and its own cmd topic, and write its own state topic;
nothing else. The bridge publishes documents and commands and reads states.

Every test that needs agent accounts runs twice, once per provisioning path (`provisioning`): made one
by one through the dynamic-security control API, as the bridge makes them, and written in bulk into the
broker's file before it starts, as `broker-config --with-agents` and the benchmarks make a fleet. A test
declares its accounts with `@agents(a1=1, b1=2)` (agent id = group id); they exist before the bridge's
link and the agents connect.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from paho.mqtt.reasoncodes import ReasonCode

from broker_bridge.broker import BrokerLink
from fabric_core.topics import cmd_topic, config_topic, group_config_filter, state_topic
from tests.broker_bridge.mosquitto.conftest import agents
from tests.support.broker import Broker, Inbox, MqttClient

NOT_AUTHORISED = 0x87
Connect = Callable[[str], MqttClient]


def granted(reason: ReasonCode) -> bool:
    return not reason.is_failure


@pytest.fixture
def bridge(mosquitto: Broker, passwords: dict[str, str]) -> BrokerLink:
    """The bridge's connection, made once the test's accounts exist (a bulk write restarts the broker)."""
    return mosquitto.link("bridge")


@pytest.fixture
def agent(mosquitto: Broker, passwords: dict[str, str]) -> Connect:
    """Connect as one of the test's agents, under its own client id: `agent("a1")`."""

    def connect(agent_id: str) -> MqttClient:
        client = mosquitto.client(agent_id, passwords[agent_id], client_id=agent_id)
        reason = client.connect()
        assert not reason.is_failure, f"agent {agent_id} could not connect: {reason}"
        return client

    return connect


def test_anonymous_connections_are_refused(mosquitto: Broker) -> None:
    reason = mosquitto.client(None, None).connect()
    assert reason.is_failure and reason.value == NOT_AUTHORISED, reason


@agents(a1=1)
def test_a_wrong_password_or_unknown_user_is_refused(mosquitto: Broker, passwords: dict[str, str]) -> None:
    # Mosquitto 2.0.11's dynamic security answers "not authorised" (0x87), not "bad credentials" (0x86).
    for username, password in (("a1", "not-the-password"), ("nobody", "x")):
        reason = mosquitto.client(username, password).connect()
        assert reason.is_failure and reason.value == NOT_AUTHORISED, (username, reason)
    assert not mosquitto.client("a1", passwords["a1"]).connect().is_failure


@agents(a1=1)
def test_a_late_agent_of_the_group_gets_the_retained_document(
    mosquitto: Broker, bridge: BrokerLink, agent: Connect
) -> None:
    topic = config_topic(mosquitto.prefix, 1, 10)
    bridge.publish(topic, b'{"serial":1}', retain=True)
    client = agent("a1")
    assert granted(client.subscribe(topic))
    message = client.expect(topic)
    assert message.payload == b'{"serial":1}' and message.retain


@agents(a1=1)
def test_retained_documents_and_accounts_survive_a_broker_restart(
    mosquitto: Broker, bridge: BrokerLink, agent: Connect
) -> None:
    topic = config_topic(mosquitto.prefix, 1, 10)
    bridge.publish(topic, b'{"serial":2}', retain=True)
    mosquitto.restart()
    client = agent("a1")  # provisioned before the restart: the dynsec JSON holds it
    assert granted(client.subscribe(topic))
    assert client.expect(topic).payload == b'{"serial":2}'


@agents(a1=1, b1=2)
def test_an_agent_reads_only_its_own_group_and_cmd_topic(mosquitto: Broker, agent: Connect) -> None:
    prefix = mosquitto.prefix
    client = agent("a1")
    assert granted(client.subscribe(config_topic(prefix, 1, 10)))
    assert granted(client.subscribe(group_config_filter(prefix, 1)))
    assert granted(client.subscribe(cmd_topic(prefix, "a1")))
    for refused in (
        config_topic(prefix, 2, 20),  # another group's location
        group_config_filter(prefix, 2),
        "#",
        f"{prefix}/#",
        f"{prefix}/v1/config/+/10",  # a wildcard reaching across groups
        cmd_topic(prefix, "b1"),  # another agent's commands
        state_topic(prefix, "b1"),  # another agent's state
        f"{prefix}/v1/agents/+/state",
        "$CONTROL/dynamic-security/#",
    ):
        reason = client.subscribe(refused)
        assert reason.is_failure and reason.value == NOT_AUTHORISED, (refused, reason)


@agents(a1=1)
def test_nothing_of_another_group_reaches_an_agent(
    mosquitto: Broker, bridge: BrokerLink, agent: Connect
) -> None:
    prefix = mosquitto.prefix
    client = agent("a1")
    assert granted(client.subscribe(config_topic(prefix, 1, 10)))
    bridge.publish(config_topic(prefix, 2, 10), b"other group", retain=True)
    bridge.publish(cmd_topic(prefix, "b1"), b"other agent")
    bridge.publish(config_topic(prefix, 1, 10), b"mine", retain=True)
    # "mine" left the broker after the others: had either been delivered, it would have come first.
    got = client.received_until(lambda got: bool(got) and got[-1].payload == b"mine")
    assert [(m.topic, m.payload) for m in got] == [(config_topic(prefix, 1, 10), b"mine")]


@agents(a1=1, a2=1, a3=1)
def test_an_agent_cannot_publish_documents_or_commands(
    mosquitto: Broker, bridge: BrokerLink, agent: Connect
) -> None:
    prefix = mosquitto.prefix
    client = agent("a1")
    assert granted(client.subscribe(cmd_topic(prefix, "a1")))
    live = agent("a2")  # a reader of the group, subscribed before the forgeries
    assert granted(live.subscribe(group_config_filter(prefix, 1)))
    for topic in (config_topic(prefix, 1, 10), config_topic(prefix, 2, 10), cmd_topic(prefix, "a1")):
        reason = client.publish(topic, b"forged", retain=True)
        assert reason.is_failure and reason.value == NOT_AUTHORISED, (topic, reason)
    # The bridge's own publication arrives, after the forgeries: so the readers would have seen them.
    bridge.publish(config_topic(prefix, 1, 10), b"genuine")
    got = live.received_until(lambda got: bool(got) and got[-1].payload == b"genuine")
    assert [(m.topic, m.payload) for m in got] == [(config_topic(prefix, 1, 10), b"genuine")]
    assert mosquitto.received_before_marker(client, cmd_topic(prefix, "a1")) == []
    # Nothing was retained either: a late reader of the group's topics gets nothing.
    late = agent("a3")
    assert granted(late.subscribe(group_config_filter(prefix, 1)))
    assert mosquitto.received_before_marker(late, config_topic(prefix, 1, 10)) == []


@agents(a1=1, b1=1)
def test_an_agent_writes_only_its_own_state_topic(
    mosquitto: Broker, bridge: BrokerLink, agent: Connect
) -> None:
    prefix = mosquitto.prefix
    states = Inbox()
    bridge.subscribe(f"{prefix}/v1/agents/+/state", states)
    client = agent("a1")
    reason = client.publish(state_topic(prefix, "b1"), b"forged", retain=True)
    assert reason.is_failure and reason.value == NOT_AUTHORISED, reason
    assert granted(client.publish(state_topic(prefix, "a1"), b"online", retain=True))
    states.wait_for(state_topic(prefix, "a1"), b"online")
    assert (state_topic(prefix, "b1"), b"forged") not in states.items


@agents(a1=1, a2=1)
def test_an_agent_account_connects_only_under_its_own_client_id(
    mosquitto: Broker, passwords: dict[str, str]
) -> None:
    """With agent A's password and agent B's client id, nothing happens to B (no session takeover)."""
    b = mosquitto.client("a2", passwords["a2"], client_id="a2")
    assert not b.connect().is_failure

    intruder = mosquitto.client("a1", passwords["a1"], client_id="a2")
    assert intruder.connect().value == NOT_AUTHORISED
    bridge_id = mosquitto.client("a1", passwords["a1"], client_id="policycast-bridge-0")
    assert bridge_id.connect().value == NOT_AUTHORISED

    assert not b.publish(state_topic(mosquitto.prefix, "a2"), b"still here").is_failure
    assert b.disconnects.empty() and b.paho.is_connected()
    assert not mosquitto.client("a1", passwords["a1"], client_id="a1").connect().is_failure
