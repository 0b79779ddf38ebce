"""The local stack's broker: the configured engine's, in the data directory, on a port kept from run to
run (agents remember it)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from broker_bridge.engine import TlsListener, engine_for
from broker_bridge.errors import BrokerNotInstalled
from fabric_core.settings import Settings
from fabric_core.signing import load_signing_key
from fabric_core.tls import manager_tls
from local_stack.broker_process import BrokerProcess
from local_stack.manager import pick_port, port_is_free


@dataclass
class LocalBroker:
    """A broker started by Policycast with its own configuration, in the data directory."""

    process: BrokerProcess
    url: str


def start_broker(settings: Settings, console: Console) -> LocalBroker | None:
    """The broker, started; None (push off) when its engine's broker is not installed here. It listens
    for MQTT over TLS only (with a certificate from the manager's CA) unless TLS is off."""
    engine = engine_for(settings, load_signing_key(settings))
    directory = settings.data_dir / "broker"
    port_file = directory / "port"
    remembered = int(port_file.read_text()) if port_file.exists() else 0
    port = remembered if remembered and port_is_free(remembered) else pick_port(0)
    try:
        if settings.tls_enabled:
            files = manager_tls(settings).issue_files(directory, "broker", settings.tls_name_list)
            launch = engine.write_config(directory, bind="127.0.0.1", tls=TlsListener.of(port, files))
        else:
            launch = engine.write_config(directory, bind="127.0.0.1", tls=None, plain_port=port)
    except BrokerNotInstalled as exc:
        console.print(
            f"[yellow]No {engine.name} broker here ({exc}): push mode is off and every agent pulls.[/]\n"
            "[yellow]Install it (apt-get install -y mosquitto) to see push agents.[/]"
        )
        return None
    port_file.write_text(f"{port}\n")
    process = BrokerProcess(launch)
    process.start()
    scheme = "mqtts" if settings.tls_enabled else "mqtt"
    return LocalBroker(process, f"{scheme}://127.0.0.1:{port}")
