"""A real NATS cluster for tests, configured by the project's own engine, on free ports.

- `NatsCluster`: N nats-server nodes in a temporary directory, written by `NatsEngine.write_cluster`
  and run by `local_stack.broker_cluster.BrokerCluster`, exactly as `policycast broker-config --engine
  nats` writes them: TLS on every listener (MQTT, NATS clients, routes) with certificates from a CA in
  the cluster's data directory (`ca`), which `ssl_context` trusts. `engine` mints the JWTs;
  `client()` gives an MQTT 3.1.1 test client (`tests.support.broker.MqttClient`), `agent()` one
  connected with an agent's enrolment credentials, `link()` the bridge's `BrokerLink`, and
  `received_before_marker()` tells that something did NOT arrive without waiting out a window.
- Fixtures: `nats_cluster` (3 nodes) and `nats_node` (1 node), one per test module: give each test
  its own prefix or agent ids. Tests that kill nodes start their own `NatsCluster`.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from broker_bridge.broker import BrokerLink
from broker_bridge.engine import ClusterNode, ClusterTls
from broker_bridge.errors import BrokerRefused, BrokerUnavailable
from broker_bridge.nats.engine import NatsEngine
from fabric_core.settings import MqttAddress, Settings
from fabric_core.tls import CA_FILE, ManagerCA, client_context
from fabric_core.topics import DEFAULT_PREFIX
from local_stack.broker_cluster import BrokerCluster
from manager_db.models import Agent
from tests.support.broker import MqttClient, Received
from tests.support.processes import free_port
from tests.support.waiting import wait_for

NAMES = ("localhost", "127.0.0.1")


class NatsCluster:
    """`nodes` nats-server processes of one cluster, with the engine that configured them."""

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 3,
        prefix: str = DEFAULT_PREFIX,
        ttl_s: int = 3600,
        data_dir: Path | None = None,
    ):
        """`data_dir`: a manager's (its CA and the NATS keys, made there by `write_cluster`, so that
        the manager's api and bridge use them); default: one of the cluster's own."""
        self.directory = directory
        self.prefix = prefix
        data_dir = data_dir or directory / "data"
        self.ca = ManagerCA.load_or_create(data_dir / "tls")  # as the api's first start makes it
        self.ssl_context = client_context(self.ca.certificate_pem)
        server = self.ca.server_files(directory / "tls", "broker", NAMES)
        route = self.ca.server_files(directory / "tls", "route", NAMES, client_auth=True)
        self._tls = ClusterTls(server, route, data_dir / "tls" / CA_FILE)
        self._data_dir, self._ttl_s, self._node_count = data_dir, ttl_s, nodes
        self._lay_out()
        self._clients: list[MqttClient] = []
        self._links: list[BrokerLink] = []
        self._marker_links: dict[int, BrokerLink] = {}
        self.started_in_s = 0.0

    def _lay_out(self) -> None:
        """Pick free ports for every node and write the cluster's configuration for them."""
        ports = ((free_port(), free_port(), free_port(), free_port()) for _ in range(self._node_count))
        self.nodes = [ClusterNode(*four) for four in ports]
        self.settings = Settings(
            data_dir=self._data_dir,
            broker_engine="nats",
            mqtt_prefix=self.prefix,
            mqtt_url=",".join(node.mqtt_url for node in self.nodes),
            nats_urls=",".join(f"tls://127.0.0.1:{node.client_port}" for node in self.nodes),
            nats_credentials_ttl_s=self._ttl_s,
        )
        self.engine = NatsEngine(self.settings, None)
        nodes, tls = self.nodes, self._tls
        launches = self.engine.write_cluster(self.directory / "nats", bind="127.0.0.1", nodes=nodes, tls=tls)
        self.cluster = BrokerCluster(launches)

    def start(self) -> NatsCluster:
        """Start every node. The first start picks other ports when another process took one of them
        between the probe and the bind (as `Broker.start` does); a restart keeps them, since clients
        hold the URLs."""
        began = time.monotonic()
        first = self.started_in_s == 0.0
        for attempt in range(3):
            try:
                self.cluster.start()
                break
            except BrokerUnavailable as exc:
                self.cluster.stop()
                if not first or attempt == 2 or "address already in use" not in str(exc):
                    raise
                self._lay_out()
        for node in range(len(self.nodes)):
            wait_for(
                functools.partial(self._takes_the_bridge, node),
                timeout=30,
                what=f"node {node} taking the bridge's MQTT connection",
                interval=0.2,
            )
        self.started_in_s = time.monotonic() - began
        return self

    def _takes_the_bridge(self, node: int) -> bool:
        """Whether `node` takes the bridge's MQTT connection now. `BrokerLink.connect` retries a closed
        connection itself, but gives up on a refusal: a loaded node has refused the account ("Not
        authorized", to the bridge and to agents alike) for a moment after the cluster formed."""
        try:
            self.link(node=node).close()
        except BrokerRefused:
            return False
        return True

    def address(self, node: int = 0) -> MqttAddress:
        return MqttAddress("127.0.0.1", self.nodes[node].mqtt_port, tls=True)

    @property
    def addresses(self) -> list[MqttAddress]:
        return [self.address(i) for i in range(len(self.nodes))]

    def client(
        self, username: str | None, password: str | None, client_id: str | None = None, *, node: int = 0
    ) -> MqttClient:
        """An MQTT 3.1.1 client (not connected yet) on `node`, trusting the cluster's CA."""
        client = MqttClient(
            self.address(node), username, password, client_id, ssl_context=self.ssl_context, protocol="3.1.1"
        )
        self._clients.append(client)
        return client

    def agent(self, agent_id: str, group_id: int, *, node: int = 0) -> MqttClient:
        """A client connected with the agent's enrolment credentials (its JWT)."""
        credentials = self.engine.enrolment_credentials(agent_id, group_id)
        client = self.client(credentials.username, credentials.password, agent_id, node=node)
        reason = client.connect()
        assert not reason.is_failure, f"agent {agent_id} could not connect: {reason}"
        return client

    def link(
        self, *, node: int | None = None, client_id: str | None = None, timeout: float = 10.0
    ) -> BrokerLink:
        """A connected `BrokerLink` with the bridge's credentials over MQTT 3.1.1: to `node`, or to
        any node (failing over) when not given."""
        username, password = self.engine.bridge_credentials()
        link = BrokerLink(
            self.addresses if node is None else self.address(node),
            username=username,
            password=password,
            client_id=client_id or f"bridge-{secrets.token_hex(4)}",
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
            ssl_context=self.ssl_context,
            protocol="3.1.1",
        )
        self._links.append(link)
        link.connect(timeout)
        return link

    def received_before_marker(
        self, client: MqttClient, topic: str, *, node: int, timeout: float = 5.0
    ) -> list[Received]:
        """What `client` receives before a marker, published now on `topic` by the bridge on `node`,
        reaches it. A node forwards what one connection publishes in order, so once the marker
        arrives, whatever the node took in before it (from a publisher on `node` that had its PUBACK)
        has arrived too. `client` must read `topic`."""
        link = self._marker_links.get(node)
        if link is None:
            link = self._marker_links[node] = self.link(node=node)
        marker = f"marker-{secrets.token_hex(6)}".encode()
        link.publish(topic, marker, qos=1)
        got = client.received_until(lambda got: bool(got) and got[-1].payload == marker, timeout=timeout)
        return got[:-1]

    def log_tail(self, node: int) -> str:
        return self.cluster.nodes[node].log_tail()

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for link in self._links:
            link.close()
        self.cluster.stop()


def add_agent(database: Engine, agent_id: str, *, revoked: bool, acl_group_id: int | None = 1) -> None:
    """An agent row in group 1 (revoked now, when `revoked`), as the api would have written it."""
    with Session(database) as session:
        session.add(
            Agent(
                id=agent_id,
                hostname=agent_id,
                group_id=1,
                secret_hash=secrets.token_hex(16),
                revoked_at=datetime.now(UTC) if revoked else None,
                acl_group_id=acl_group_id,
            )
        )
        session.commit()


def _started(directory: Path, nodes: int) -> Iterator[NatsCluster]:
    cluster = NatsCluster(directory, nodes=nodes)
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A 3-node NATS cluster for the test module (give each test its own agent ids)."""
    yield from _started(tmp_path_factory.mktemp("nats-cluster"), 3)


@pytest.fixture(scope="module")
def nats_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A single NATS node for the test module."""
    yield from _started(tmp_path_factory.mktemp("nats-node"), 1)
