"""The bridge's commands: `policycast bridge` and `policycast broker-config` (registered by the root,
`local_stack.cli`)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from broker_bridge.engine import BrokerLaunch, ClusterNode, ClusterTls, TlsListener, engine_for
from broker_bridge.mosquitto import bulk
from broker_bridge.mosquitto.engine import MosquittoEngine
from broker_bridge.service import Bridge, connect_link
from fabric_core.console import fail, load_settings, stderr, stdout
from fabric_core.settings import Settings
from fabric_core.signing import load_signing_key
from fabric_core.tls import CA_FILE, manager_tls
from manager_db.database import describe, guarded, make_engine, require_schema


def bridge() -> None:
    """Relay documents and commands to the broker, keep agents' broker access, bring agent state back.

    Run one or more; one at a time holds the relay lease."""
    settings = load_settings(Settings)
    engine = make_engine(settings.resolved_database_url)
    signing_key = guarded(lambda: load_signing_key(settings, create=False), "loading the signing key")
    guarded(lambda: require_schema(engine), "checking the database")
    broker = engine_for(settings, signing_key)
    link = guarded(lambda: connect_link(settings, broker), "trusting the broker")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stdout.print(
        f"bridge: database {describe(settings.resolved_database_url)}, "
        f"{broker.name} broker {settings.mqtt_address.url}"
    )
    link.start()
    try:
        Bridge(settings=settings, engine=engine, broker=broker, link=link).run(stop)
    finally:
        link.close()
    stdout.print("bridge stopped")


def broker_config(
    out: Annotated[Path, typer.Option(help="directory for the broker's configuration, data and log")],
    port: Annotated[int, typer.Option(help="the broker's MQTT-over-TLS port (of the first node)")] = 8883,
    bind: Annotated[str, typer.Option(help="the broker's listening address")] = "0.0.0.0",
    plain_port: Annotated[
        int | None,
        typer.Option(help="mosquitto: also listen for plain MQTT here (passwords in clear: avoid)"),
    ] = None,
    plugin: Annotated[
        str | None, typer.Option(help="mosquitto: path of mosquitto_dynamic_security.so")
    ] = None,
    run_as: Annotated[str | None, typer.Option(help="user the broker drops to when started by root")] = None,
    engine: Annotated[
        str | None, typer.Option(help="mosquitto or nats; default: POLICYCAST_BROKER_ENGINE")
    ] = None,
    nodes: Annotated[int, typer.Option(min=1, max=32, help="nats: how many cluster nodes")] = 1,
    hosts: Annotated[
        str | None,
        typer.Option(
            help="nats: each node's host, comma-separated (one per node, same ports on each); "
            "default: every node on this host, ports counted up from the first node's"
        ),
    ] = None,
    client_port: Annotated[int, typer.Option(help="nats: the NATS client port (system account)")] = 4222,
    cluster_port: Annotated[int, typer.Option(help="nats: the cluster route port")] = 6222,
    monitor_port: Annotated[int, typer.Option(help="nats: the monitoring port (on 127.0.0.1)")] = 8222,
    with_agents: Annotated[
        bool,
        typer.Option(
            help="mosquitto: also write every active agent's account from the database into the stopped "
            "broker's file, in one write (the control API costs O(N^2) on 2.0.11), recorded as provisioned"
        ),
    ] = False,
) -> None:
    """Write the broker's configuration for Policycast (the engine of POLICYCAST_BROKER_ENGINE, or
    --engine).

    MQTT over TLS with a certificate from the manager's CA for POLICYCAST_TLS_NAMES (the CA is made in
    the data directory if the api has not made it yet). Mosquitto: dynamic security, persistence,
    fleet-sized queues; the bridge's broker password is POLICYCAST_MQTT_PASSWORD, or derived from the
    signing key. NATS: operator mode (its keys made in the data directory on first use), a cluster of
    --nodes, TLS on every listener, JetStream for MQTT sessions and retained documents."""
    settings = load_settings(Settings)
    if plugin is not None:
        settings = settings.model_copy(update={"mosquitto_plugin": plugin})
    if engine is not None:
        if engine not in ("mosquitto", "nats"):
            fail(f"unknown broker engine {engine!r}: mosquitto or nats")
        settings = settings.model_copy(update={"broker_engine": engine})
    if plain_port is not None:
        stderr.print(f"[yellow]warning:[/] plain MQTT on port {plain_port}: passwords travel in clear there")
    if settings.broker_engine == "mosquitto" and nodes > 1:
        fail("the mosquitto engine runs one node: --nodes is for nats")
    host_list = [h.strip() for h in hosts.split(",") if h.strip()] if hosts else None
    if host_list is not None and len(host_list) != nodes:
        fail(f"--hosts names {len(host_list)} host(s) for {nodes} node(s)")
    local = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
    cluster = [
        ClusterNode(
            mqtt_port=port + (0 if host_list else i),
            client_port=client_port + (0 if host_list else i),
            cluster_port=cluster_port + (0 if host_list else i),
            monitor_port=monitor_port + (0 if host_list else i),
            host=host_list[i] if host_list else local,
        )
        for i in range(nodes)
    ]

    def write() -> tuple[BrokerLaunch, ...]:
        signing_key = None
        if settings.broker_engine == "mosquitto" and not settings.mqtt_password:
            signing_key = load_signing_key(settings, create=False)
        broker = engine_for(settings, signing_key)
        tls = manager_tls(settings)
        names = settings.tls_name_list
        if settings.broker_engine == "mosquitto" or (nodes == 1 and plain_port is not None):
            certificates = tls.issue_files(out, "broker", names)
            listener = TlsListener.of(port, certificates)
            return (broker.write_config(out, bind=bind, tls=listener, plain_port=plain_port, run_as=run_as),)
        cluster_tls = ClusterTls(
            server=tls.issue_files(out, "broker", names),
            route=tls.issue_files(out, "route", names, client_auth=True),
            ca_file=settings.tls_ca_file or settings.tls_dir / CA_FILE,
        )
        return broker.write_cluster(out, bind=bind, nodes=cluster, tls=cluster_tls, run_as=run_as)

    launches = guarded(write, "writing the broker configuration")
    if len(launches) == 1 and launches[0].monitor_url is None:
        stdout.print(f"wrote the broker's configuration in {out}; run: {' '.join(launches[0].argv)}")
    else:
        _summary(out, settings.broker_engine, cluster, launches)
    if with_agents:
        count = guarded(lambda: _agent_accounts(settings, out), "writing the agents' broker accounts")
        stdout.print(f"wrote the broker accounts of {count} active agent(s); the bridge will not redo them")


def _summary(out: Path, engine: str, nodes: list[ClusterNode], launches: tuple[BrokerLaunch, ...]) -> None:
    """What was written, node by node, and what the manager's processes must be told."""
    table = Table(title=f"{engine} broker: {len(launches)} node(s) in {out}", title_justify="left")
    for column in ("node", "MQTT (mqtts)", "NATS (tls)", "routes (tls)", "http monitor"):
        table.add_column(column, no_wrap=True)
    for node, launch in zip(nodes, launches, strict=True):
        routes = f"{node.host}:{node.cluster_port}" if len(nodes) > 1 else "-"
        monitoring = (launch.monitor_url or "-").removeprefix("http://")
        table.add_row(
            launch.name.removeprefix("policycast-"),
            f"{node.host}:{node.mqtt_port}",
            f"{node.host}:{node.client_port}",
            routes,
            monitoring,
        )
    stdout.print(table)
    stdout.print("Monitoring listens on 127.0.0.1 only: /healthz, /varz, /jsz, /connz on each node's host.")
    stdout.print("Start each node (on its host); its log is beside its configuration:")
    for launch in launches:
        stdout.print(f"  {' '.join(launch.argv)}", soft_wrap=True, highlight=False)
        stdout.print(f"    log: {launch.log_path}", soft_wrap=True, highlight=False)
    stdout.print("Stop one gracefully with SIGUSR2 (lame duck: clients leave over 30 s), or SIGTERM.")
    stdout.print("Tell the api and the bridge (every replica the same):")
    stdout.print(f"  POLICYCAST_BROKER_ENGINE={engine}", soft_wrap=True, highlight=False)
    stdout.print(
        f"  POLICYCAST_MQTT_URL={','.join(n.mqtt_url for n in nodes)}", soft_wrap=True, highlight=False
    )
    nats_urls = ",".join(f"tls://{n.host}:{n.client_port}" for n in nodes)
    stdout.print(f"  POLICYCAST_NATS_URLS={nats_urls}", soft_wrap=True, highlight=False)
    stdout.print(
        "  and the same POLICYCAST_DATA_DIR (its nats_keys.json), or POLICYCAST_NATS_KEYS with its content",
        soft_wrap=True,
        highlight=False,
    )


def _agent_accounts(settings: Settings, out: Path) -> int:
    """`--with-agents`: every active agent's account, into the (stopped) broker's file in `out`."""
    broker = engine_for(settings, load_signing_key(settings, create=False))  # passwords derive from it
    if not isinstance(broker, MosquittoEngine):
        raise ValueError(f"the {broker.name} engine keeps no agent accounts in the broker's files")
    database = make_engine(settings.resolved_database_url)
    try:
        require_schema(database)
        return bulk.provision_fleet(database, broker, out)
    finally:
        database.dispose()
