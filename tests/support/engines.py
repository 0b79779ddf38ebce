"""The push tests' broker, on either engine: a real Mosquitto or a real 3-node NATS cluster.

`PushBroker` is what a push test needs of the broker under test, whatever the engine: where it is
(`url`: every node), what the manager's settings must say to use it (`manager_settings`), MQTT test
clients that speak the engine's protocol and QoS (`client`), the bridge's rights (`link`,
`received_before_marker`), and an outage (`stop`, `start`). `MosquittoBroker` is `tests.support.broker.
Broker`; `NatsBroker` wraps `tests.support.nats.NatsCluster`, made in the manager's data directory so
that the manager's api and bridge find its CA and NATS keys there.

`ENGINES` parametrises a fixture over both; the NATS one carries the `cluster` marker. `start_push_broker`
makes and starts the one a parameter names.
"""

from __future__ import annotations

import secrets
import ssl
from pathlib import Path
from typing import Any, Protocol

import pytest
from pydantic import SecretStr

from broker_bridge.broker import BrokerLink
from fabric_core.tls import ManagerCA
from tests.support.broker import Broker, MqttClient, Received, require_mosquitto
from tests.support.nats import NatsCluster

ENGINES = ["mosquitto", pytest.param("nats", marks=pytest.mark.cluster)]
"""Parameters of a fixture that runs push tests on both engines."""


class PushBroker(Protocol):
    engine: str
    ssl_context: ssl.SSLContext | None

    @property
    def url(self) -> str:
        """Every node's MQTT URL, comma-separated (POLICYCAST_MQTT_URL)."""
        ...

    def manager_settings(self) -> dict[str, Any]:
        """What the manager's (api's and bridge's) settings need to use this broker."""
        ...

    def client(self, username: str | None, password: str | None, client_id: str | None = None) -> MqttClient:
        """An MQTT test client (not connected) speaking what agents speak on this engine."""
        ...

    def link(self, client_id: str | None = None, *, timeout: float = 10.0) -> BrokerLink:
        """A connected `BrokerLink` with the bridge's rights."""
        ...

    def provision(self, agent_id: str, group_id: str | int) -> str:
        """An agent account reading `group_id`; its password (NATS: a JWT, nothing written)."""
        ...

    def received_before_marker(
        self, client: MqttClient, topic: str, *, timeout: float = 5.0
    ) -> list[Received]: ...

    def stop(self) -> None: ...

    def start(self) -> Any: ...

    def close(self) -> None: ...


class MosquittoBroker(Broker):
    """`Broker`, as a `PushBroker`."""

    engine = "mosquitto"

    def manager_settings(self) -> dict[str, Any]:
        return {
            "broker_engine": "mosquitto",
            "mqtt_url": self.url,
            "mqtt_password": SecretStr(self.bridge_password),
        }


class NatsBroker:
    """A 3-node NATS cluster, as a `PushBroker`."""

    engine = "nats"

    def __init__(self, directory: Path, data_dir: Path, *, nodes: int = 3) -> None:
        self.nats = NatsCluster(directory, nodes=nodes, data_dir=data_dir)
        self.ssl_context = self.nats.ssl_context

    @property
    def url(self) -> str:
        return self.nats.settings.mqtt_url

    def manager_settings(self) -> dict[str, Any]:
        settings = self.nats.settings
        return {"broker_engine": "nats", "mqtt_url": settings.mqtt_url, "nats_urls": settings.nats_urls}

    def client(
        self, username: str | None, password: str | None, client_id: str | None = None, *, node: int = 0
    ) -> MqttClient:
        return self.nats.client(username, password, client_id, node=node)

    def link(self, client_id: str | None = None, *, timeout: float = 10.0) -> BrokerLink:
        return self.nats.link(client_id=client_id or f"bridge-{secrets.token_hex(4)}", timeout=timeout)

    def provision(self, agent_id: str, group_id: str | int) -> str:
        return self.nats.engine.enrolment_credentials(agent_id, int(group_id)).password

    def received_before_marker(
        self, client: MqttClient, topic: str, *, timeout: float = 5.0
    ) -> list[Received]:
        node = next(i for i, a in enumerate(self.nats.addresses) if a.port == client.address.port)
        return self.nats.received_before_marker(client, topic, node=node, timeout=timeout)

    def stop(self) -> None:
        self.nats.cluster.stop()

    def start(self) -> NatsBroker:
        self.nats.start()
        return self

    def close(self) -> None:
        self.nats.close()


def start_push_broker(engine: str, directory: Path, data_dir: Path) -> PushBroker:
    """The broker `engine` names, started, with certificates from the CA in `data_dir` (the
    manager's, made here before the manager's first start finds it)."""
    broker: PushBroker
    if engine == "mosquitto":
        require_mosquitto()
        broker = MosquittoBroker(directory / "mosquitto", ca=ManagerCA.load_or_create(data_dir / "tls"))
    else:
        broker = NatsBroker(directory / "nats", data_dir)
    broker.start()
    return broker
