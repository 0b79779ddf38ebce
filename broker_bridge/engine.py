"""The broker-engine seam: everything that differs per MQTT broker, behind one interface.

The fabric speaks plain MQTT to any broker. What differs per engine (DESIGN.md section 4) is behind
`BrokerEngine`:

- writing the broker's configuration (`write_config`), for an operator (`policycast broker-config`)
  and for the local stack and the tests, which run what it returns (`BrokerLaunch`) with
  `local_stack.broker_process`;
- the bridge's own account (`bridge_credentials`);
- an agent's access: its credentials at enrolment (`enrolment_credentials`), and its account when it
  enrols, moves group or is revoked (`provision`, `move`, `remove`, called by `reconcile`);
- the delivery options agents should use (`delivery`: QoS and session), sent at enrolment.

The bridge, the enrolment route and the local stack talk only to this interface; `engine_for` picks
the implementation from the `broker_engine` setting. Mosquitto with dynamic security
(`broker_bridge.mosquitto`) is the first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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


class BrokerEngine(ABC):
    """One kind of MQTT broker, configured and authorised the way Policycast needs."""

    name: ClassVar[str]
    delivery: ClassVar[MqttDelivery]

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


def engine_for(settings: Settings, signing_key: SigningKey | None) -> BrokerEngine:
    """The engine that the `broker_engine` setting names."""
    from broker_bridge.mosquitto.engine import MosquittoEngine  # engines import this module

    engines: dict[str, type[BrokerEngine]] = {engine.name: engine for engine in (MosquittoEngine,)}
    return engines[settings.broker_engine](settings, signing_key)
