"""The push tests' broker, on either engine: a real Mosquitto or a real 3-node NATS cluster.

`PushBroker` is what a push test needs of the broker under test, whatever the engine: where it is
(`url`: every node), what the manager's settings must say to use it (`manager_settings`), MQTT test
clients that speak the engine's protocol and QoS (`client`), the bridge's rights (`link`,
`received_before_marker`; `bridge_link_options` for the agent's own `MqttLink`, one node at a time),
an agent's broker account as enrolment hands it out (`agent_credentials`, `delivery`, `trusted_cas`),
moving that account to another group as the engine does (`move`), and an outage (`stop`, `start`).
`MosquittoBroker` is `tests.support.broker.Broker`; `NatsBroker` wraps `tests.support.nats.NatsCluster`,
made in the manager's data directory so that the manager's api and bridge find its CA and NATS keys
there.

`ENGINES` parametrises a fixture over both; the NATS one carries the `cluster` marker. `start_push_broker`
makes and starts the one a parameter names.
"""

from __future__ import annotations

import secrets
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pytest
from pydantic import SecretStr

from agent_stub.mqtt_link import LinkOptions
from broker_bridge.broker import BrokerLink
from broker_bridge.mosquitto import accounts
from broker_bridge.nats.engine import NatsEngine
from fabric_core.canonical import canonical_json
from fabric_core.tls import ManagerCA
from fabric_core.topics import cmd_topic
from fabric_core.wire import AgentCommand, MqttCredentials, MqttDelivery
from tests.support.broker import Broker, MqttClient, Received, require_mosquitto
from tests.support.nats import NatsCluster

ENGINES = ["mosquitto", pytest.param("nats", marks=pytest.mark.cluster)]
"""Parameters of a fixture that runs push tests on both engines."""


class PushBroker(Protocol):
    engine_name: str
    """"mosquitto" or "nats" (not `engine`: Mosquitto's `Broker.engine` is its `MosquittoEngine`)."""
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

    @property
    def delivery(self) -> MqttDelivery:
        """How agents subscribe on this engine (`MqttCredentials.delivery`)."""
        ...

    @property
    def nodes(self) -> int:
        """How many nodes the broker has (`bridge_link_options(node=...)`)."""
        ...

    @property
    def trusted_cas(self) -> list[str]:
        """The CA certificates (PEM) an agent pins for this broker (`Identity.trusted_cas`)."""
        ...

    def agent_credentials(self, agent_id: str, group_id: int) -> MqttCredentials:
        """The agent's broker account reading `group_id`, as enrolment hands it out (Mosquitto: an
        account provisioned now, MQTT 5, persistent session at QoS 1; NATS: a JWT, every node's URL,
        QoS 0 on a clean session over MQTT 3.1.1)."""
        ...

    def bridge_link_options(self, client_id: str, *, node: int = 0) -> LinkOptions:
        """`agent_stub.mqtt_link.LinkOptions` with the bridge's rights, on `node`, in the engine's
        protocol: for a stand-in bridge made of the agent's own `MqttLink`."""
        ...

    def move(self, agent_id: str, *, old_group_id: int, new_group_id: int) -> None:
        """Move the agent's account to `new_group_id` as the engine does (Mosquitto: its roles on the
        broker; NATS: a `credentials` command with a JWT for the new group on its cmd topic)."""
        ...

    def received_before_marker(
        self, client: MqttClient, topic: str, *, timeout: float = 5.0
    ) -> list[Received]: ...

    def stop(self) -> None: ...

    def start(self) -> Any: ...

    def close(self) -> None: ...


class MosquittoBroker(Broker):
    """`Broker`, as a `PushBroker`."""

    engine_name = "mosquitto"

    def manager_settings(self) -> dict[str, Any]:
        return {
            "broker_engine": "mosquitto",
            "mqtt_url": self.url,
            "mqtt_password": SecretStr(self.bridge_password),
        }

    delivery = MqttDelivery()
    nodes = 1

    @property
    def trusted_cas(self) -> list[str]:
        return mosquitto_trusted_cas(self)

    def agent_credentials(self, agent_id: str, group_id: int) -> MqttCredentials:
        return mosquitto_agent_credentials(self, agent_id, group_id)

    def bridge_link_options(self, client_id: str, *, node: int = 0) -> LinkOptions:
        assert node == 0, "one Mosquitto: node 0 only"
        return LinkOptions(
            address=self.address,
            client_id=client_id,
            username=self.bridge_username,
            password=self.bridge_password,
            timeout_s=2,
            ssl_context=self.ssl_context,
        )

    def move(self, agent_id: str, *, old_group_id: int, new_group_id: int) -> None:
        accounts.move_agent(
            self.admin,
            prefix=self.prefix,
            agent_id=agent_id,
            old_group_id=old_group_id,
            new_group_id=new_group_id,
        )


def mosquitto_trusted_cas(broker: Broker) -> list[str]:
    """`PushBroker.trusted_cas` of any `Broker` (the `mosquitto` fixture's too)."""
    return [broker.ca.certificate_pem.decode()] if broker.ca is not None else []


def mosquitto_agent_credentials(broker: Broker, agent_id: str, group_id: int) -> MqttCredentials:
    """`PushBroker.agent_credentials` of any `Broker`: an account provisioned now (MQTT 5, persistent
    session at QoS 1, as enrolment on Mosquitto hands it out)."""
    password = broker.provision(agent_id, group_id)
    return MqttCredentials(url=broker.url, username=agent_id, password=password, prefix=broker.prefix)


class NatsBroker:
    """A 3-node NATS cluster, as a `PushBroker`."""

    engine_name = "nats"

    def __init__(self, directory: Path, data_dir: Path, *, nodes: int = 3) -> None:
        self.nats = NatsCluster(directory, nodes=nodes, data_dir=data_dir)
        self.ssl_context: ssl.SSLContext | None = self.nats.ssl_context
        self._admin_link: BrokerLink | None = None

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

    delivery = NatsEngine.delivery

    @property
    def nodes(self) -> int:
        return len(self.nats.nodes)

    @property
    def trusted_cas(self) -> list[str]:
        return [self.nats.ca.certificate_pem.decode()]

    def agent_credentials(self, agent_id: str, group_id: int) -> MqttCredentials:
        return self.nats.engine.enrolment_credentials(agent_id, group_id)

    def bridge_link_options(self, client_id: str, *, node: int = 0) -> LinkOptions:
        username, password = self.nats.engine.bridge_credentials()
        return LinkOptions(
            address=self.nats.address(node),
            client_id=client_id,
            username=username,
            password=password,
            clean_start=True,
            timeout_s=2,
            ssl_context=self.ssl_context,
            protocol="3.1.1",
        )

    def move(self, agent_id: str, *, old_group_id: int, new_group_id: int) -> None:
        """The command `NatsEngine.move` sends, but retained: the engine publishes it once at QoS 0 (the
        heartbeat brings the JWT too), and an agent whose sessions are refused one after the other (its
        JWT may not read its new group) is subscribed to its cmd topic only between two SUBACKs; its
        next subscription gets a retained command at once. (The agent's client ignores a command id
        it has seen; its agent id is a test's own, so nothing else reads it.)"""
        engine = self.nats.engine
        command = AgentCommand(
            command="credentials",
            id=f"credentials-{secrets.token_hex(8)}",
            issued_at=datetime.now(UTC),
            mqtt=engine.enrolment_credentials(agent_id, new_group_id),
        )
        payload = canonical_json(command.model_dump(mode="json", exclude_none=True))
        self._admin().publish(cmd_topic(self.nats.prefix, agent_id), payload, qos=1, retain=True)

    def _admin(self) -> BrokerLink:
        if self._admin_link is None:
            self._admin_link = self.link("test-provisioner")
        return self._admin_link

    def received_before_marker(
        self, client: MqttClient, topic: str, *, timeout: float = 5.0
    ) -> list[Received]:
        node = next(i for i, a in enumerate(self.nats.addresses) if a.port == client.address.port)
        return self.nats.received_before_marker(client, topic, node=node, timeout=timeout)

    def stop(self) -> None:
        self.nats.cluster.stop()

    def start(self) -> NatsBroker:
        """Start every node; return once each takes the bridge's MQTT connection (a node can close
        the first ones for a moment after the cluster formed)."""
        self.nats.start()  # returns once every node takes the bridge's MQTT connection
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
