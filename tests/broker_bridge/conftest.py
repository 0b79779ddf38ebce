"""Broker tests: a real Mosquitto per test (tests.support.broker), the bridge's link, and agents."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker_bridge.broker import BrokerLink
from tests.support.broker import Broker, MqttClient

AgentFactory = Callable[..., MqttClient]


@pytest.fixture
def bridge(mosquitto: Broker) -> BrokerLink:
    """The bridge's connection to the broker."""
    return mosquitto.link("bridge")


@pytest.fixture
def agent(mosquitto: Broker) -> AgentFactory:
    """Provision an agent account in a group and connect as it: `agent("a1", group_id=1)`."""

    def make(agent_id: str, *, group_id: str | int) -> MqttClient:
        password = mosquitto.provision(agent_id, group_id)
        client = mosquitto.client(agent_id, password, client_id=agent_id)
        reason = client.connect()
        assert not reason.is_failure, f"agent {agent_id} could not connect: {reason}"
        return client

    return make


from tests.support.stack import push_broker, stack  # noqa: E402, F401  (the fixtures)
