"""nats-server's configuration, as Policycast writes it: one file per node of a cluster of N.

`render_node` gives one node's `nats-server.conf`, commented with why each setting is there;
`write_cluster_files` writes every node's into `directory/node-<i>/` (`NodeLayout`) with its JetStream
store, its resolver directory and its log. Every listener is TLS with certificates from the manager's
CA: MQTT (agents and the bridge), NATS clients (the bridge's system-account connection), and the
cluster routes, whose certificates serve as client certificates too and are verified both ways.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from broker_bridge.engine import ClusterNode
from fabric_core.tls import CertificateFiles

CLUSTER_NAME = "policycast"
READY_MARKER = b"Server is ready"
"""nats-server logs this once every listener is bound (JetStream may still be electing leaders)."""
LAME_DUCK_S = 30
"""nats-server's minimum: clients are closed over this long on a graceful stop (SIGUSR2: lame duck),
so that a fleet does not reconnect to the other nodes all in the same second."""
LAME_DUCK_GRACE_S = 5


def nats_url(node: ClusterNode) -> str:
    """The node's NATS client listener (TLS): the bridge's system-account connection."""
    return f"tls://{node.host}:{node.client_port}"


def route_url(node: ClusterNode) -> str:
    return f"tls://{node.host}:{node.cluster_port}"


def monitor_url(node: ClusterNode) -> str:
    """Monitoring listens on loopback only: reach it from the node's own host."""
    return f"http://127.0.0.1:{node.monitor_port}"


@dataclass(frozen=True, slots=True)
class NodeLayout:
    """Where one node keeps its files: everything under `directory`."""

    directory: Path

    @property
    def config_path(self) -> Path:
        return self.directory / "nats-server.conf"

    @property
    def jetstream_dir(self) -> Path:
        return self.directory / "jetstream"

    @property
    def resolver_dir(self) -> Path:
        return self.directory / "accounts"

    @property
    def log_path(self) -> Path:
        return self.directory / "nats-server.log"

    @property
    def pid_path(self) -> Path:
        return self.directory / "nats-server.pid"


@dataclass(frozen=True, slots=True)
class Trust:
    """The operator-mode JWTs every node is configured with."""

    operator_jwt: str
    system_account: str
    """The system account's public key."""
    preload: dict[str, str]
    """account public key -> account JWT: the system account and Policycast's, stored in each node's
    resolver directory at start unless it holds a newer one (a pushed revocation survives restarts)."""


def node_name(index: int) -> str:
    return f"policycast-{index + 1}"


def node_layout(directory: Path, index: int) -> NodeLayout:
    return NodeLayout(directory / f"node-{index + 1}")


def _q(value: str | Path) -> str:
    """A quoted string in nats-server's configuration syntax (JSON's string escapes)."""
    return json.dumps(str(value))


def _tls_block(files: CertificateFiles, *, ca_file: Path | None = None, verify: bool = False) -> str:
    lines = [f"cert_file: {_q(files.certfile)}", f"key_file: {_q(files.keyfile)}"]
    if ca_file is not None:
        lines.append(f"ca_file: {_q(ca_file)}")
    if verify:
        lines.append("verify: true")
    lines.append("timeout: 2")
    return "tls {\n    " + "\n    ".join(lines) + "\n  }"


def render_node(
    *,
    index: int,
    nodes: Sequence[ClusterNode],
    bind: str,
    layout: NodeLayout,
    trust: Trust,
    server_tls: CertificateFiles,
    route_tls: CertificateFiles | None,
    ca_file: Path | None,
) -> str:
    """One node's `nats-server.conf` in a cluster of `nodes` (a single node has no cluster block)."""
    me = nodes[index]
    replicas = min(3, len(nodes))
    preload = "\n".join(f"  {key}: {_q(token)}" for key, token in sorted(trust.preload.items()))
    cluster = ""
    if len(nodes) > 1:
        if route_tls is None or ca_file is None:
            raise ValueError(
                "a cluster's routes need certificates that are client certificates too, and the CA"
            )
        routes = ",\n    ".join(_q(route_url(node)) for i, node in enumerate(nodes) if i != index)
        cluster = f"""
# The cluster: routes to every other node, TLS both ways (each node's certificate is a client
# certificate too, from the manager's CA, and every node verifies its peers').
cluster {{
  name: {_q(CLUSTER_NAME)}
  listen: {_q(f"{bind}:{me.cluster_port}")}
  routes: [
    {routes}
  ]
  {_tls_block(route_tls, ca_file=ca_file, verify=True)}
}}
"""
    return f"""\
# Written by Policycast (broker_bridge.nats.config). nats-server 2.15, node {index + 1} of {len(nodes)}.
server_name: {_q(node_name(index))}

# NATS clients: only the bridge's system-account connection (account updates), over TLS.
listen: {_q(f"{bind}:{me.client_port}")}
{_tls_block(server_tls)}

# Monitoring (/healthz, /varz, /jsz, /connz), on loopback only: it needs no credentials.
http: {_q(f"127.0.0.1:{me.monitor_port}")}
{cluster}
# Operator mode: agents and the bridge authenticate with user JWTs that the manager mints; nothing
# is written here per agent. The full resolver keeps account JWTs in a directory per node and
# replicates updates (revocations) pushed through the system account to every node.
operator: {_q(trust.operator_jwt)}
system_account: {_q(trust.system_account)}
resolver: {{
  type: full
  dir: {_q(layout.resolver_dir)}
  allow_delete: false
  interval: "2m"
  timeout: "2s"
}}
resolver_preload: {{
{preload}
}}

# NATS keeps MQTT sessions and retained messages in JetStream. Each QoS 1 subscription would be a
# consumer (capped at 1,000 per stream by default): agents use QoS 0 on clean sessions and make none.
jetstream {{
  store_dir: {_q(layout.jetstream_dir)}
  limits {{
    default_max_consumers: -1
  }}
}}

# MQTT 3.1.1 over TLS (the only MQTT NATS speaks). Retained documents and sessions are replicated to
# {replicas} node(s), so that a node's loss loses no retained document.
mqtt {{
  listen: {_q(f"{bind}:{me.mqtt_port}")}
  {_tls_block(server_tls)}
  stream_replicas: {replicas}
  ack_wait: "30s"
  max_ack_pending: 1024
}}

# A graceful stop (SIGUSR2: lame duck) closes clients over {LAME_DUCK_S} s, not all at once.
lame_duck_duration: "{LAME_DUCK_S}s"
lame_duck_grace_period: "{LAME_DUCK_GRACE_S}s"

# Readable logs: errors, warnings and notices with timestamps; no debug or trace (JWTs would show).
logfile: {_q(layout.log_path)}
logtime: true
debug: false
trace: false
pid_file: {_q(layout.pid_path)}
# Documents are small; a bigger payload is refused rather than buffered.
max_payload: 1048576
"""


def write_cluster_files(
    directory: Path,
    *,
    nodes: Sequence[ClusterNode],
    bind: str,
    trust: Trust,
    server_tls: CertificateFiles,
    route_tls: CertificateFiles | None,
    ca_file: Path | None,
) -> list[NodeLayout]:
    """Write every node's configuration (and make its directories); their layouts, in order."""
    if not nodes:
        raise ValueError("a cluster needs one node at least")
    layouts = []
    for index in range(len(nodes)):
        layout = node_layout(directory, index)
        for path in (layout.directory, layout.jetstream_dir, layout.resolver_dir):
            path.mkdir(parents=True, exist_ok=True)
        text = render_node(
            index=index,
            nodes=nodes,
            bind=bind,
            layout=layout,
            trust=trust,
            server_tls=server_tls,
            route_tls=route_tls,
            ca_file=ca_file,
        )
        layout.config_path.write_text(text)
        layout.config_path.chmod(0o600)  # holds no secret, but the JWTs name the keys
        layouts.append(layout)
    return layouts
