"""What the broker lets each account do, with real MQTT 5 clients reading reason codes.

An agent may read its own group's config topics and its own cmd topic, and write its own state topic;
nothing else. The bridge publishes documents and commands and reads states.
"""

from __future__ import annotations

from paho.mqtt.reasoncodes import ReasonCode

from broker_bridge.broker import BrokerLink
from fabric_core.topics import cmd_topic, config_topic, group_config_filter, state_topic
from tests.broker_bridge.conftest import AgentFactory
from tests.support.broker import Broker, Inbox

NOT_AUTHORISED = 0x87


def granted(reason: ReasonCode) -> bool:
    return not reason.is_failure


def test_anonymous_connections_are_refused(mosquitto: Broker) -> None:
    reason = mosquitto.client(None, None).connect()
    assert reason.is_failure and reason.value == NOT_AUTHORISED, reason


def test_a_wrong_password_or_unknown_user_is_refused(mosquitto: Broker) -> None:
    mosquitto.provision("a1", 1)
    # Mosquitto 2.0.11's dynamic security answers "not authorised" (0x87), not "bad credentials" (0x86).
    for username, password in (("a1", "not-the-password"), ("nobody", "x")):
        reason = mosquitto.client(username, password).connect()
        assert reason.is_failure and reason.value == NOT_AUTHORISED, (username, reason)


def test_a_late_agent_of_the_group_gets_the_retained_document(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    topic = config_topic(mosquitto.prefix, 1, 10)
    bridge.publish(topic, b'{"serial":1}', retain=True)
    client = agent("a1", group_id=1)
    assert granted(client.subscribe(topic))
    message = client.expect(topic)
    assert message.payload == b'{"serial":1}' and message.retain


def test_retained_documents_survive_a_broker_restart(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    topic = config_topic(mosquitto.prefix, 1, 10)
    bridge.publish(topic, b'{"serial":2}', retain=True)
    mosquitto.restart()
    client = agent("a1", group_id=1)  # provisioned after the restart: the dynsec JSON was saved too
    assert granted(client.subscribe(topic))
    assert client.expect(topic).payload == b'{"serial":2}'


def test_an_agent_reads_only_its_own_group_and_cmd_topic(mosquitto: Broker, agent: AgentFactory) -> None:
    prefix = mosquitto.prefix
    mosquitto.provision("b1", 2)
    client = agent("a1", group_id=1)
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


def test_nothing_of_another_group_reaches_an_agent(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    prefix = mosquitto.prefix
    client = agent("a1", group_id=1)
    assert granted(client.subscribe(config_topic(prefix, 1, 10)))
    bridge.publish(config_topic(prefix, 2, 10), b"other group", retain=True)
    bridge.publish(cmd_topic(prefix, "b1"), b"other agent")
    bridge.publish(config_topic(prefix, 1, 10), b"mine", retain=True)
    # "mine" left the broker after the others: had either been delivered, it would have come first.
    got = client.received_until(lambda got: bool(got) and got[-1].payload == b"mine")
    assert [(m.topic, m.payload) for m in got] == [(config_topic(prefix, 1, 10), b"mine")]


def test_an_agent_cannot_publish_documents_or_commands(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    prefix = mosquitto.prefix
    client = agent("a1", group_id=1)
    assert granted(client.subscribe(cmd_topic(prefix, "a1")))
    live = agent("a2", group_id=1)  # a reader of the group, subscribed before the forgeries
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
    late = agent("a3", group_id=1)
    assert granted(late.subscribe(group_config_filter(prefix, 1)))
    assert mosquitto.received_before_marker(late, config_topic(prefix, 1, 10)) == []


def test_an_agent_writes_only_its_own_state_topic(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    prefix = mosquitto.prefix
    states = Inbox()
    bridge.subscribe(f"{prefix}/v1/agents/+/state", states)
    client = agent("a1", group_id=1)
    mosquitto.provision("b1", 1)
    reason = client.publish(state_topic(prefix, "b1"), b"forged", retain=True)
    assert reason.is_failure and reason.value == NOT_AUTHORISED, reason
    assert granted(client.publish(state_topic(prefix, "a1"), b"online", retain=True))
    states.wait_for(state_topic(prefix, "a1"), b"online")
    assert (state_topic(prefix, "b1"), b"forged") not in states.items
