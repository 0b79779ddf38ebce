"""Agent accounts: provisioning is idempotent, moves switch the readable group, removal locks out."""

from __future__ import annotations

from broker_bridge.broker import BrokerLink
from broker_bridge.mosquitto import accounts, dynsec
from broker_bridge.mosquitto.control import control
from fabric_core.topics import cmd_topic, config_topic, state_topic
from tests.broker_bridge.conftest import AgentFactory
from tests.support.broker import Broker, Inbox

NOT_AUTHORISED = 0x87


def roles_of(link: BrokerLink, username: str) -> list[str]:
    (response,) = dynsec.check(control(link, [dynsec.get_client(username)]))
    return sorted(dynsec.client_roles(response))


def test_provisioning_twice_resets_the_password(mosquitto: Broker) -> None:
    first = mosquitto.provision("a1", 1)
    second = mosquitto.provision("a1", 1)
    assert mosquitto.client("a1", first).connect().value == NOT_AUTHORISED
    assert not mosquitto.client("a1", second).connect().is_failure
    assert roles_of(mosquitto.admin, "a1") == ["pc-agent-a1", "pc-group-1"]


def test_a_resync_without_reset_leaves_a_connected_agent_alone(
    mosquitto: Broker, agent: AgentFactory
) -> None:
    client = agent("a1", group_id=1)
    accounts.provision_agent(
        mosquitto.admin, prefix=mosquitto.prefix, agent_id="a1", group_id=1, password="ignored", reset=False
    )
    # A round trip after the broker answered the resync: a kicked client would get no PUBACK.
    assert not client.publish(state_topic(mosquitto.prefix, "a1"), b"still here").is_failure
    assert client.disconnects.empty()
    assert client.paho.is_connected()


def test_a_resync_without_reset_corrects_the_group(mosquitto: Broker) -> None:
    mosquitto.provision("a1", 1)
    accounts.provision_agent(
        mosquitto.admin, prefix=mosquitto.prefix, agent_id="a1", group_id=2, password="x", reset=False
    )
    assert roles_of(mosquitto.admin, "a1") == ["pc-agent-a1", "pc-group-2"]


def test_ensure_group_role_is_idempotent(mosquitto: Broker) -> None:
    for _ in range(2):
        assert accounts.ensure_group_role(mosquitto.admin, mosquitto.prefix, 7) == "pc-group-7"


def test_a_moved_agent_reads_the_new_group_and_no_longer_the_old(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    prefix = mosquitto.prefix
    old, new = config_topic(prefix, 1, 10), config_topic(prefix, 2, 20)
    client = agent("a1", group_id=1)
    assert not client.subscribe(old).is_failure
    accounts.move_agent(bridge, prefix=prefix, agent_id="a1", old_group_id=1, new_group_id=2)
    client.wait_disconnected()  # the broker drops the agent so that it comes back with its new rights

    # The agent's persistent session would keep the old subscription: delivery is checked too.
    password = mosquitto.provision("a1", 2)
    again = mosquitto.client("a1", password)  # under its own client id, the only one its account takes
    assert not again.connect().is_failure
    assert again.subscribe(old).value == NOT_AUTHORISED
    assert not again.subscribe(new).is_failure
    bridge.publish(new, b"new group")
    assert again.expect(new).payload == b"new group"


def test_a_moved_agents_old_subscription_delivers_nothing(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    prefix = mosquitto.prefix
    old = config_topic(prefix, 1, 10)
    password = mosquitto.provision("a1", 1)
    client = mosquitto.client("a1", password, client_id="a1")
    assert not client.connect(clean_start=False).is_failure
    assert not client.subscribe(old).is_failure
    accounts.move_agent(bridge, prefix=prefix, agent_id="a1", old_group_id=1, new_group_id=2)
    client.wait_disconnected()
    resumed = mosquitto.client("a1", password, client_id="a1")  # same session, old subscription in it
    assert not resumed.connect(clean_start=False).is_failure
    assert not resumed.subscribe(cmd_topic(prefix, "a1")).is_failure  # where the marker comes
    bridge.publish(old, b"old group", retain=True)
    assert mosquitto.received_before_marker(resumed, cmd_topic(prefix, "a1")) == []


def test_a_removed_agent_cannot_connect_and_leaves_no_state(mosquitto: Broker, bridge: BrokerLink) -> None:
    prefix = mosquitto.prefix
    password = mosquitto.provision("a1", 1)
    client = mosquitto.client("a1", password, client_id="a1").will(state_topic(prefix, "a1"), b"offline")
    assert not client.connect().is_failure
    assert not client.publish(state_topic(prefix, "a1"), b"online", retain=True).is_failure

    accounts.remove_agent(bridge, prefix=prefix, agent_id="a1")
    client.wait_disconnected()
    assert mosquitto.client("a1", password).connect().value == NOT_AUTHORISED
    # Its last retained state is cleared. (Its will is not sent: dynsec disconnects without the will.)
    states = Inbox()
    mosquitto.link("state-reader").subscribe(state_topic(prefix, "a1"), states)  # SUBACK awaited
    # A retained state would be sent right after the SUBACK, so before a marker published now.
    marker = mosquitto.publish_marker(state_topic(prefix, "a1"))
    states.wait_for(state_topic(prefix, "a1"), marker)
    assert states.items == [(state_topic(prefix, "a1"), marker)]
    accounts.remove_agent(bridge, prefix=prefix, agent_id="a1")  # again: nothing to do, no error
