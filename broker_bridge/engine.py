"""The broker-engine seam: everything that differs per MQTT broker, behind one interface.

The fabric speaks plain MQTT to any broker. What differs per engine (DESIGN.md section 4) is behind
`BrokerEngine`:

- writing the broker's configuration (`write_config`), for an operator (`policycast broker-config`)
  and for the local stack and the tests, which run what it returns (`BrokerLaunch`) with
  `local_stack.broker_process`;
- the bridge's own account (`bridge_credentials`);
- an agent's access: its credentials at enrolment (`enrolment_credentials`), renewed through the
  heartbeat when they expire (`refreshed_credentials`), and its account when it enrols, moves group or
  is revoked (`provision`, `move`, `remove`/`remove_many`, called by `reconcile`, which first lets the
  engine bring the broker in line after a reconnect: `resync`);
- the delivery options agents should use (`delivery`: QoS, session, MQTT version), sent at enrolment;
- a cluster of N nodes (`write_cluster`; an engine that does not cluster writes one node);
- a watch the lease-holding bridge keeps on the broker's connections (`watch`, renewed with the lease,
  `stop_watching`; NATS: the takeover guard, which binds agents' client ids to their keys).

The bridge, the enrolment route and the local stack talk only to this interface; `engine_for` picks
the implementation from the `broker_engine` setting. Mosquitto with dynamic security
(`broker_bridge.mosquitto`) is the first; NATS with operator-mode JWTs (`broker_bridge.nats`) the second.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sqlalchemy import Engine

from broker_bridge.broker import BrokerLink
from fabric_core.settings import Settings
from fabric_core.signing import SigningKey
from fabric_core.tls import CertificateFiles
from fabric_core.wire import MqttCredentials, MqttDelivery


@dataclass(frozen=True, slots=True)
class TlsListener:
    """A listener for MQTT over TLS: its port, and the broker's certificate chain and key (PEM files)."""

    port: int
    certfile: Path
    keyfile: Path

    @classmethod
    def of(cls, port: int, files: CertificateFiles) -> TlsListener:
        return cls(port, files.certfile, files.keyfile)


@dataclass(frozen=True, slots=True)
class BrokerLaunch:
    """How to run a broker from the files an engine wrote: the command, and how to tell it is up."""

    argv: tuple[str, ...]
    log_path: Path
    """Where the broker's output goes (the process's stdout and stderr too)."""
    ready_marker: bytes
    """What the broker logs once all its listeners are bound."""
    host: str
    port: int
    monitor_url: str | None = None
    """An HTTP monitoring endpoint (NATS: /healthz, /jsz), where the engine has one."""
    name: str = "broker"


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """Where one node of a broker cluster listens: MQTT over TLS, and the ports a clustering engine
    needs besides (NATS: its client port, its cluster routes, its monitoring on loopback). `host`:
    how the other nodes and clients reach it."""

    mqtt_port: int
    client_port: int = 0
    cluster_port: int = 0
    monitor_port: int = 0
    host: str = "127.0.0.1"

    @property
    def mqtt_url(self) -> str:
        return f"mqtts://{self.host}:{self.mqtt_port}"


@dataclass(frozen=True, slots=True)
class ClusterTls:
    """The certificates of a cluster's listeners: the servers' (MQTT, clients), the routes' (server
    and client certificates at once, verified both ways), and the CA that issued them (PEM file)."""

    server: CertificateFiles
    route: CertificateFiles | None = None
    ca_file: Path | None = None


class BrokerEngine(ABC):
    """One kind of MQTT broker, configured and authorised the way Policycast needs."""

    name: ClassVar[str]
    delivery: ClassVar[MqttDelivery]
    access_in_credentials: ClassVar[bool] = False
    """True: an agent's credentials carry its access (NATS JWTs name their subjects): nothing to
    provision, and enrolment records the access as granted (`agents.acl_group_id`)."""

    def __init__(self, settings: Settings, signing_key: SigningKey | None) -> None:
        self.settings = settings
        self._signing_key = signing_key

    @property
    def signing_key(self) -> SigningKey:
        """The manager's key, from which the engine derives secrets; `ValueError` when not given
        (`policycast broker-config` may run with POLICYCAST_MQTT_PASSWORD and no key)."""
        if self._signing_key is None:
            raise ValueError("this needs the manager's signing key (POLICYCAST_SIGNING_KEY or the data dir)")
        return self._signing_key

    @abstractmethod
    def write_config(
        self,
        directory: Path,
        *,
        bind: str,
        tls: TlsListener | None,
        plain_port: int | None = None,
        run_as: str | None = None,
    ) -> BrokerLaunch:
        """Write the broker's configuration into `directory` (keeping the broker's own state there);
        return how to run it (its readiness is checked on the TLS port, else the plain one).

        `tls`: the MQTT-over-TLS listener, the one the fabric uses; `plain_port`: a plaintext listener,
        only when an operator asks for one (neither: `ValueError`). `run_as`: the user a broker started
        by root drops to."""

    def write_cluster(
        self,
        directory: Path,
        *,
        bind: str,
        nodes: Sequence[ClusterNode],
        tls: ClusterTls,
        run_as: str | None = None,
    ) -> tuple[BrokerLaunch, ...]:
        """Write the configuration of every node of a cluster into `directory`; how to run each, in
        order. An engine that does not cluster writes one node (`write_config`) and refuses more."""
        if len(nodes) != 1:
            raise ValueError(f"the {self.name} engine runs one node, not {len(nodes)}")
        listener = TlsListener(nodes[0].mqtt_port, tls.server.certfile, tls.server.keyfile)
        return (self.write_config(directory, bind=bind, tls=listener, run_as=run_as),)

    @abstractmethod
    def check_installed(self) -> None:
        """Raise `BrokerNotInstalled` (saying how to install it) when this machine lacks the broker."""

    @abstractmethod
    def bridge_credentials(self) -> tuple[str, str]:
        """(username, password) of the bridge's own broker account."""

    @abstractmethod
    def enrolment_credentials(self, agent_id: str, group_id: int) -> MqttCredentials:
        """What a newly enrolled agent connects with: URL, account, topic prefix, delivery options."""

    @abstractmethod
    def provision(self, link: BrokerLink, *, agent_id: str, group_id: int) -> None:
        """Give a new agent its access: read its group's config topics and its cmd topic, write its
        state topic. Idempotent."""

    @abstractmethod
    def move(self, link: BrokerLink, *, agent_id: str, old_group_id: int, new_group_id: int) -> None:
        """Let the agent read the new group's config topics instead of the old group's."""

    @abstractmethod
    def remove(self, link: BrokerLink, *, agent_id: str) -> None:
        """Take a revoked agent's access away, at once. Idempotent."""

    def remove_many(self, link: BrokerLink, agent_ids: Sequence[str], *, database: Engine) -> None:
        """Take several revoked agents' access away (one round of `reconcile`). Default: `remove`
        each; an engine whose removal rewrites one list (NATS's revocations) does it once, from the
        agents table in `database`."""
        for agent_id in agent_ids:
            self.remove(link, agent_id=agent_id)

    def resync(self, link: BrokerLink, *, database: Engine) -> None:
        """Bring what the broker holds beyond agent accounts in line with the agents table, when the
        link (re)connected (NATS: push the account JWT with its revocations, which a node restarted
        from an older configuration may lack). Default: nothing."""
        return None

    def watch(self, *, until: float) -> None:
        """Watch the broker's connections until `until` (time.monotonic(): the lease's deadline),
        called by the lease-holding bridge at each renewal, which extends it; it lapses by itself when
        the lease is lost. Must not block nor raise. Default: nothing (Mosquitto binds client ids)."""
        return None

    def stop_watching(self) -> None:
        """End `watch` at once (the bridge releases the lease). Default: nothing."""
        return None

    def refreshed_credentials(
        self, agent_id: str, group_id: int, *, expires_at: int | None, document_changed: bool
    ) -> MqttCredentials | None:
        """New credentials for an agent's heartbeat answer when its current ones (expiring at
        `expires_at`, unix time; None: unknown) are due for renewal or no longer fit its document
        (`document_changed`: a group move). None: keep what it has (the default: passwords that never
        expire)."""
        return None


def engine_for(settings: Settings, signing_key: SigningKey | None) -> BrokerEngine:
    """The engine that the `broker_engine` setting names."""
    from broker_bridge.mosquitto.engine import MosquittoEngine  # engines import this module
    from broker_bridge.nats.engine import NatsEngine

    engines: dict[str, type[BrokerEngine]] = {engine.name: engine for engine in (MosquittoEngine, NatsEngine)}
    return engines[settings.broker_engine](settings, signing_key)
