"""`BrokerLink`: acknowledged publishing, reconnection, restored subscriptions."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker_bridge import broker
from broker_bridge.broker import BrokerLink, Publication
from broker_bridge.errors import BrokerRefused, BrokerUnavailable
from fabric_core.tls import ManagerCA, client_context
from fabric_core.topics import all_states_filter, config_topic, group_config_filter, state_topic
from tests.broker_bridge.conftest import AgentFactory
from tests.support.broker import Broker, Inbox
from tests.support.waiting import wait_for


def test_publish_fails_while_the_broker_is_down_and_works_after_it_returns(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    topic = config_topic(mosquitto.prefix, 1, 10)
    mosquitto.stop()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        bridge.publish(topic, b"lost?", retain=True, timeout=0.5)
    assert time.monotonic() - started < 2
    assert not bridge.connected.is_set()
    mosquitto.start()
    wait_for(bridge.connected.is_set, timeout=5, what="the link to reconnect")
    bridge.publish(topic, b"after", retain=True, timeout=5)
    client = agent("a1", group_id=1)
    client.subscribe(topic)
    assert client.expect(topic).payload == b"after"


def test_publish_waits_for_a_reconnect_within_its_timeout(mosquitto: Broker, bridge: BrokerLink) -> None:
    mosquitto.restart()
    bridge.publish(config_topic(mosquitto.prefix, 1, 10), b"doc", retain=True, timeout=5)


def test_a_lost_connection_fails_waiting_publishes_at_once(
    mosquitto: Broker, bridge: BrokerLink, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = mosquitto.process.pid
    assert pid is not None
    waiting = threading.Event()
    real_wait = broker._Acks.wait

    def wait(acks: Any, *args: Any, **kwargs: Any) -> Any:
        waiting.set()  # sent: the publish now waits for its PUBACK
        return real_wait(acks, *args, **kwargs)

    monkeypatch.setattr(broker._Acks, "wait", wait)
    os.kill(pid, signal.SIGSTOP)  # the broker stops answering: the PUBACK never comes
    errors: list[Exception] = []

    def publish() -> None:
        try:
            bridge.publish(config_topic(mosquitto.prefix, 1, 10), b"doc", timeout=30)
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    assert waiting.wait(5), "the publish never went out"
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 3
    assert len(errors) == 1 and isinstance(errors[0], BrokerUnavailable), errors
    assert "connection was lost" in str(errors[0])
    mosquitto.stop()


def test_a_late_acknowledgement_is_not_taken_for_another_message(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    pid = mosquitto.process.pid
    assert pid is not None
    topic = config_topic(mosquitto.prefix, 1, 10)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(BrokerUnavailable, match="timed out"):
            bridge.publish(topic, b"slow", retain=True, timeout=0.3)
    finally:
        os.kill(pid, signal.SIGCONT)
    # The broker now takes the abandoned message (at least once: the caller will retry it) and acks it.
    bridge.publish(topic, b"next", retain=True, timeout=5)
    client = agent("a1", group_id=1)
    client.subscribe(topic)
    assert client.expect(topic).payload == b"next"


def test_publish_many_waits_for_every_acknowledgement(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    items = [
        Publication(config_topic(mosquitto.prefix, 1, n), b"doc %d" % n, retain=True) for n in range(500)
    ]
    bridge.publish_many(items, timeout=10)
    client = agent("a1", group_id=1)
    client.subscribe(group_config_filter(mosquitto.prefix, 1))
    got = {client.expect(item.topic).payload for item in items}
    assert len(got) == 500


def test_a_refused_publication_raises(mosquitto: Broker, bridge: BrokerLink) -> None:
    with pytest.raises(BrokerRefused) as caught:
        bridge.publish("elsewhere/topic", b"x")
    assert caught.value.reason_code == 0x87


def test_subscriptions_come_back_after_a_broker_restart(
    mosquitto: Broker, bridge: BrokerLink, agent: AgentFactory
) -> None:
    states = Inbox()
    bridge.subscribe(all_states_filter(mosquitto.prefix), states)
    mosquitto.provision("a1", 1)
    mosquitto.restart()
    wait_for(bridge.connected.is_set, timeout=5, what="the link to reconnect")
    client = agent("a1", group_id=1)
    client.publish(state_topic(mosquitto.prefix, "a1"), b"online", retain=True)
    states.wait_for(state_topic(mosquitto.prefix, "a1"), b"online")


def test_wrong_bridge_credentials_fail_fast(mosquitto: Broker) -> None:
    link = BrokerLink(
        mosquitto.address,
        username="policycast-bridge",
        password="wrong",
        client_id="b",
        ssl_context=mosquitto.ssl_context,
    )
    started = time.monotonic()
    with pytest.raises(BrokerRefused, match="Not authorized"):
        link.connect(timeout=5)
    assert time.monotonic() - started < 2


def test_connect_keeps_trying_until_the_broker_starts(mosquitto: Broker) -> None:
    mosquitto.stop()
    link = BrokerLink(
        mosquitto.address,
        username=mosquitto.bridge_username,
        password=mosquitto.bridge_password,
        client_id="early",
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
        ssl_context=mosquitto.ssl_context,
    )
    try:
        with pytest.raises(BrokerUnavailable):
            link.connect(timeout=0.3)
        mosquitto.start()
        wait_for(link.connected.is_set, timeout=5, what="the link to connect")
    finally:
        link.close()


def test_the_bridge_refuses_a_broker_whose_certificate_another_ca_issued(mosquitto: Broker) -> None:
    """Over TLS the bridge trusts exactly the manager's CA: a broker with a certificate from any other
    CA (an impostor on the broker's address) never gets the bridge's password."""
    other_ca = client_context(ManagerCA.generate("another CA").certificate_pem)
    link = BrokerLink(
        mosquitto.address,
        username=mosquitto.bridge_username,
        password=mosquitto.bridge_password,
        client_id="wary",
        ssl_context=other_ca,
    )
    try:
        with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            link.connect(timeout=1)
    finally:
        link.close()


def test_a_node_that_refuses_the_bridge_sends_it_to_the_next_and_only_every_refusal_is_final(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """A cluster's node can refuse the bridge's account for a moment after the cluster formed: the
    bridge goes on to the next node instead of giving up; wrong credentials still fail fast."""
    # The same CA, its own bridge password: it refuses the first broker's.
    other = Broker(tmp_path / "other", ca=mosquitto.ca).start()
    try:
        link = BrokerLink(
            [other.address, mosquitto.address],
            username="policycast-bridge",
            password=mosquitto.bridge_password,
            client_id="b-failover",
            ssl_context=mosquitto.ssl_context,
        )
        link.connect(timeout=10)
        assert link.address == mosquitto.address
        link.close()
        wrong = BrokerLink(
            [other.address, mosquitto.address],
            username="policycast-bridge",
            password="wrong",
            client_id="b-wrong",
            ssl_context=mosquitto.ssl_context,
        )
        with pytest.raises(BrokerRefused, match="Not authorized"):
            wrong.connect(timeout=10)
    finally:
        other.close()
