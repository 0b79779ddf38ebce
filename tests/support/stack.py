"""The manager in-process, a real broker and a bridge thread: the push path without processes.

The `stack` fixture runs each test on both engines (`tests.support.engines.ENGINES`): a real
Mosquitto, and a real 3-node NATS cluster (marked `cluster`)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.fabric import Fabric
from broker_bridge.engine import engine_for
from broker_bridge.service import Bridge, BridgeThread
from fabric_core.settings import Settings
from local_stack.composition import manager_app
from tests.support.broker import MqttClient
from tests.support.clients import Admin, AgentClient
from tests.support.engines import ENGINES, PushBroker, start_push_broker
from tests.support.waiting import wait_for


def bridge_thread(client: TestClient, broker: PushBroker) -> BridgeThread:
    """A bridge for the in-process manager, on its own thread, as `policycast bridge` would run."""
    fabric = client.app.state.fabric  # type: ignore[attr-defined]
    link = broker.link(f"bridge-{secrets.token_hex(3)}")
    broker_engine = engine_for(fabric.settings, fabric.signing_key)
    bridge = Bridge(settings=fabric.settings, engine=fabric.engine, broker=broker_engine, link=link)
    return BridgeThread(bridge).start()


class Stack:
    """The in-process manager (`client`, `admin`, `fabric`), its Mosquitto and its bridge thread."""

    def __init__(self, client: TestClient, broker: PushBroker, bridge: BridgeThread) -> None:
        self.client = client
        self.admin = Admin(client)
        self.broker = broker
        self.bridge = bridge

    @property
    def fabric(self) -> Fabric:
        """The manager's `Fabric`: its settings, database engine, signing key, view and ledger."""
        fabric: Fabric = self.client.app.state.fabric  # type: ignore[attr-defined]
        return fabric

    def push_agent(self, group_id: int, hostname: str = "host") -> tuple[AgentClient, MqttClient]:
        """Enrol an agent, wait for the bridge to provision its broker account (Mosquitto; NATS needs
        none: the enrolment's JWT is the account), and connect as it."""
        agent = self.admin.enroll(group_id, hostname=hostname)
        mqtt = agent.enrolment["mqtt"]
        assert ",".join(mqtt["urls"]) == self.broker.url and mqtt["username"] == agent.id

        def connected() -> MqttClient | None:
            client = self.broker.client(mqtt["username"], mqtt["password"], client_id=mqtt["username"])
            if client.connect().is_failure:
                client.close()
                return None
            return client

        client = wait_for(connected, timeout=10, what="the bridge to provision the agent's broker account")
        return agent, client


@pytest.fixture(params=ENGINES)
def push_broker(request: pytest.FixtureRequest, tmp_path: Path, settings: Settings) -> Iterator[PushBroker]:
    """The broker under test, on each engine, trusting the manager's CA (made in its data directory)."""
    broker = start_push_broker(request.param, tmp_path / "broker", settings.data_dir)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def stack(settings: Settings, push_broker: PushBroker) -> Iterator[Stack]:
    settings = settings.model_copy(update={**push_broker.manager_settings(), "bridge_poll_s": 0.05})
    with TestClient(manager_app(settings)) as client:
        bridge = bridge_thread(client, push_broker)
        try:
            yield Stack(client, push_broker, bridge)
        finally:
            bridge.stop()
            assert bridge.error is None, f"the bridge died: {bridge.error!r}"
