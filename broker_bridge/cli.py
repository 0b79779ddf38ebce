"""The bridge's commands: `policycast bridge` and `policycast broker-config` (registered by the root,
`local_stack.cli`)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from broker_bridge.engine import BrokerLaunch, TlsListener, engine_for
from broker_bridge.mosquitto import bulk
from broker_bridge.mosquitto.engine import MosquittoEngine
from broker_bridge.service import Bridge, connect_link
from fabric_core.console import load_settings, stderr, stdout
from fabric_core.settings import Settings
from fabric_core.signing import load_signing_key
from fabric_core.tls import manager_tls
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
    port: Annotated[int, typer.Option(help="the broker's MQTT-over-TLS port")] = 8883,
    bind: Annotated[str, typer.Option(help="the broker's listening address")] = "0.0.0.0",
    plain_port: Annotated[
        int | None, typer.Option(help="also listen for plain MQTT here (passwords in clear: avoid)")
    ] = None,
    plugin: Annotated[
        str | None, typer.Option(help="mosquitto: path of mosquitto_dynamic_security.so")
    ] = None,
    run_as: Annotated[str | None, typer.Option(help="user the broker drops to when started by root")] = None,
    with_agents: Annotated[
        bool,
        typer.Option(
            help="mosquitto: also write every active agent's account from the database into the stopped "
            "broker's file, in one write (the control API costs O(N^2) on 2.0.11), recorded as provisioned"
        ),
    ] = False,
) -> None:
    """Write the broker's configuration for Policycast (the engine of POLICYCAST_BROKER_ENGINE).

    MQTT over TLS with a certificate from the manager's CA for POLICYCAST_TLS_NAMES (the CA is made in
    the data directory if the api has not made it yet). Mosquitto: dynamic security, persistence,
    fleet-sized queues. The bridge's broker password is POLICYCAST_MQTT_PASSWORD, or derived from the
    signing key."""
    settings = load_settings(Settings)
    if plugin is not None:
        settings = settings.model_copy(update={"mosquitto_plugin": plugin})
    if plain_port is not None:
        stderr.print(f"[yellow]warning:[/] plain MQTT on port {plain_port}: passwords travel in clear there")

    def write() -> BrokerLaunch:
        signing_key = None if settings.mqtt_password else load_signing_key(settings, create=False)
        broker = engine_for(settings, signing_key)
        certificates = manager_tls(settings).issue_files(out, "broker", settings.tls_name_list)
        tls = TlsListener.of(port, certificates)
        return broker.write_config(out, bind=bind, tls=tls, plain_port=plain_port, run_as=run_as)

    launch = guarded(write, "writing the broker configuration")
    stdout.print(f"wrote the broker's configuration in {out}; run: {' '.join(launch.argv)}")
    if with_agents:
        count = guarded(lambda: _agent_accounts(settings, out), "writing the agents' broker accounts")
        stdout.print(f"wrote the broker accounts of {count} active agent(s); the bridge will not redo them")


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
