"""`NatsEngine`: a NATS cluster (nats-server 2.15's MQTT) in operator mode, the second broker engine.

Nothing is written to the broker per agent. At enrolment the manager mints the agent a bearer user
JWT (`credentials.agent_jwt`: MQTT only, its group's config subjects and its cmd subject to read, its
state subject to write) that expires after `nats_credentials_ttl_s`; the heartbeat hands out a new one
before that (`refreshed_credentials`). A group move sends the agent a `credentials` command with a
JWT for its new group. A revocation adds the agent's (derived) user key to the account JWT's
revocation list, rebuilt whole from the agents table every time, which the bridge pushes to the
cluster as the system user (`$SYS.REQ.CLAIMS.UPDATE`; the full resolver stores it on every node and
disconnects the revoked agent's connection).

An agent's client id is bound to its key by the takeover guard (`broker_bridge.nats.takeover`), which
the lease-holding bridge runs (`watch`): another key under an agent's client id is kicked, and its
agent revoked (`quarantine`) when it does it again.

Delivery: QoS 0 on clean sessions over MQTT 3.1.1 (each QoS 1 subscription would be a JetStream
consumer), retained documents replicated on up to 3 nodes; the bridge's anti-entropy repairs losses.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

import orjson
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker_bridge.broker import BrokerLink
from broker_bridge.engine import BrokerEngine, BrokerLaunch, ClusterNode, ClusterTls, TlsListener
from broker_bridge.errors import BrokerUnavailable
from broker_bridge.nats import config, credentials
from broker_bridge.nats.install import nats_server_binary
from broker_bridge.nats.keys import NatsKeys, load_nats_keys
from broker_bridge.nats.sysclient import request_any
from fabric_core.canonical import canonical_json
from fabric_core.settings import Settings
from fabric_core.tls import CertificateFiles, client_context, manager_trust
from fabric_core.topics import cmd_topic
from fabric_core.wire import AgentCommand, MqttCredentials, MqttDelivery
from manager_db.models import Agent, as_utc

if TYPE_CHECKING:
    from broker_bridge.nats.takeover import TakeoverGuard

log = logging.getLogger(__name__)

CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"
"""Answered by every node of the full resolver, which stores the account JWT if it is newer."""
DEFAULT_CLIENT_PORT = 4222
DEFAULT_MONITOR_PORT = 8222
PUSH_TIMEOUT_S = 5.0
RESYNC_EVERY_S = 30.0
"""How often the lease-holding bridge pushes the account JWT even when nothing changed."""
CLOCK_SKEW_S = 60
"""Revocations are kept this much longer than the credentials' lifetime, for replicas' clocks."""


class NatsEngine(BrokerEngine):
    name: ClassVar[str] = "nats"
    delivery: ClassVar[MqttDelivery] = MqttDelivery(qos=0, persistent_session=False, protocol="3.1.1")
    access_in_credentials: ClassVar[bool] = True

    def __init__(self, settings: Settings, signing_key: object | None = None) -> None:
        super().__init__(settings, None)  # JWTs are signed with the NATS keys, not the signing key
        self._keys: NatsKeys | None = None
        self._lock = threading.Lock()
        self._last_account_iat = 0
        self._synced_sessions = -1
        self._synced_at = 0.0
        self._revocations: dict[str, int] = {}
        self._quarantined: dict[str, int] = {}
        """Keys the takeover guard revoked (key -> revocation time), added to every push until every
        JWT they revoke has expired (not in the agents table: kept by this process only)."""
        self._guard: TakeoverGuard | None = None
        self._ssl_context: ssl.SSLContext | None = None

    @property
    def keys(self) -> NatsKeys:
        """The operator, account and system keys (`broker_bridge.nats.keys`); made only by
        `write_config`, which is what an operator runs first."""
        if self._keys is None:
            self._keys = load_nats_keys(self.settings, create=False)
        return self._keys

    # --- configuration --------------------------------------------------------------------------

    def write_config(
        self,
        directory: Path,
        *,
        bind: str,
        tls: TlsListener | None,
        plain_port: int | None = None,
        run_as: str | None = None,
    ) -> BrokerLaunch:
        """One node, its NATS client port that of the first `nats_urls` (default 4222), monitoring on
        127.0.0.1:8222. NATS listens on TLS only: `plain_port` is refused."""
        if tls is None or plain_port is not None:
            raise ValueError("the nats engine listens for MQTT over TLS only (no plain port)")
        client_port = urlsplit(self.settings.nats_url_list[0]).port or DEFAULT_CLIENT_PORT
        node = ClusterNode(tls.port, client_port, 0, DEFAULT_MONITOR_PORT, host=_local_host(bind))
        cluster_tls = ClusterTls(CertificateFiles(tls.certfile, tls.keyfile))
        (launch,) = self.write_cluster(directory, bind=bind, nodes=[node], tls=cluster_tls, run_as=run_as)
        return launch

    def write_cluster(
        self,
        directory: Path,
        *,
        bind: str,
        nodes: Sequence[ClusterNode],
        tls: ClusterTls,
        run_as: str | None = None,
    ) -> tuple[BrokerLaunch, ...]:
        """Every node's `nats-server.conf` under `directory/node-<i>/`. Makes the NATS keys in the data
        directory on first use. `run_as` is not used: nats-server does not switch users (run it as
        the user that owns `directory`)."""
        self._keys = load_nats_keys(self.settings, create=True)
        keys = self._keys
        trust = config.Trust(
            operator_jwt=credentials.operator_jwt(keys),
            system_account=keys.system_account.public_key,
            preload={
                keys.system_account.public_key: credentials.system_account_jwt(keys),
                keys.account.public_key: credentials.account_jwt(keys),
            },
        )
        layouts = config.write_cluster_files(
            directory,
            nodes=nodes,
            bind=bind,
            trust=trust,
            server_tls=tls.server,
            route_tls=tls.route,
            ca_file=tls.ca_file,
        )
        binary = nats_server_binary()
        return tuple(
            BrokerLaunch(
                argv=(binary, "-c", str(layout.config_path)),
                log_path=layout.log_path,
                ready_marker=config.READY_MARKER,
                host=_local_host(bind) if bind in ("0.0.0.0", "", "::") else bind,
                port=node.mqtt_port,
                monitor_url=config.monitor_url(node),
                name=config.node_name(index),
            )
            for index, (node, layout) in enumerate(zip(nodes, layouts, strict=True))
        )

    # --- credentials ----------------------------------------------------------------------------

    def check_installed(self) -> None:
        nats_server_binary()

    def bridge_credentials(self) -> tuple[str, str]:
        return self.settings.mqtt_username, credentials.bridge_jwt(
            self.keys, prefix=self.settings.mqtt_prefix
        )

    def enrolment_credentials(self, agent_id: str, group_id: int) -> MqttCredentials:
        expires = credentials.expiry(self.settings.nats_credentials_ttl_s)
        token = credentials.agent_jwt(
            self.keys, prefix=self.settings.mqtt_prefix, agent_id=agent_id, group_id=group_id, expires=expires
        )
        urls = [address.url for address in self.settings.mqtt_public_addresses]
        return MqttCredentials(
            url=urls[0],
            urls=urls,
            username=agent_id,
            password=token,
            prefix=self.settings.mqtt_prefix,
            delivery=self.delivery,
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    def refreshed_credentials(
        self, agent_id: str, group_id: int, *, expires_at: int | None, document_changed: bool
    ) -> MqttCredentials | None:
        """New credentials when the agent's expire within half their lifetime, are unknown, or no
        longer fit its document (a group move)."""
        half = self.settings.nats_credentials_ttl_s / 2
        if document_changed or expires_at is None or expires_at - time.time() <= half:
            return self.enrolment_credentials(agent_id, group_id)
        return None

    # --- agents' access -------------------------------------------------------------------------

    def provision(self, link: BrokerLink, *, agent_id: str, group_id: int) -> None:
        """Nothing: the agent's JWT carries its permissions."""

    def move(self, link: BrokerLink, *, agent_id: str, old_group_id: int, new_group_id: int) -> None:
        """Send the agent a JWT for its new group on its cmd topic (its old JWT cannot read the new
        group's config; it also gets one with its next heartbeat)."""
        command = AgentCommand(
            command="credentials",
            id=f"credentials-{secrets.token_hex(8)}",
            issued_at=datetime.now(UTC),
            mqtt=self.enrolment_credentials(agent_id, new_group_id),
        )
        payload = canonical_json(command.model_dump(mode="json", exclude_none=True))
        link.publish(cmd_topic(self.settings.mqtt_prefix, agent_id), payload, qos=self.delivery.qos)

    def remove(self, link: BrokerLink, *, agent_id: str) -> None:
        """Revoke the agent's user key, with the revocations last read from the agents table
        (`remove_many` reads them again)."""
        with self._lock:
            revocations = dict(self._revocations)
        revocations[self.keys.agent_user(agent_id).public_key] = int(time.time()) + self._revocation_margin
        self._push(revocations)

    def remove_many(self, link: BrokerLink, agent_ids: Sequence[str], *, database: Engine) -> None:
        """One push of the account JWT, its revocation list rebuilt whole from the agents table."""
        self._push(self.revocations_from(database))

    def resync(self, link: BrokerLink, *, database: Engine) -> None:
        """Push the account JWT whenever the bridge (re)connected, and every `RESYNC_EVERY_S`: a node
        that was down during a push restarts with the older account JWT of its resolver directory
        and would accept a revoked agent until the full resolver's own sync (every 2 minutes)."""
        now = time.monotonic()
        if link.sessions == self._synced_sessions and now - self._synced_at < RESYNC_EVERY_S:
            return
        self._push(self.revocations_from(database))
        self._synced_sessions, self._synced_at = link.sessions, now

    def quarantine(self, user_key: str) -> None:
        """Revoke a user key at once (the takeover guard's answer to an agent that steals sessions),
        and keep it in every later push for the credentials' lifetime."""
        with self._lock:
            self._quarantined[user_key] = int(time.time()) + self._revocation_margin
            revocations = dict(self._revocations)
        self._push(revocations)

    # --- the takeover guard ---------------------------------------------------------------------

    def watch(self, *, until: float) -> None:
        """Run the takeover guard until `until` (monotonic: the lease's deadline; each call extends
        it), starting it if it is not running."""
        from broker_bridge.nats.takeover import TakeoverGuard  # it imports this module's type

        with self._lock:
            if self._guard is not None and self._guard.alive:
                self._guard.extend(until)
                return
            self._guard = TakeoverGuard(self, until=until).start()

    def stop_watching(self) -> None:
        with self._lock:
            guard, self._guard = self._guard, None
        if guard is not None:
            guard.stop()

    @property
    def guard(self) -> TakeoverGuard | None:
        return self._guard

    @property
    def _revocation_margin(self) -> int:
        return self.settings.nats_credentials_ttl_s + CLOCK_SKEW_S

    def revocations_from(self, database: Engine) -> dict[str, int]:
        """user public key -> unix time, for every agent revoked within the credentials' lifetime
        (older ones' JWTs have all expired). Each entry revokes the JWTs issued up to the revocation
        plus that lifetime: any JWT a replica minted meanwhile, whatever its clock."""
        since = datetime.now(UTC) - timedelta(seconds=self._revocation_margin)
        with Session(database) as session:
            rows = session.exec(
                select(Agent.id, Agent.revoked_at).where(
                    col(Agent.revoked_at).is_not(None), col(Agent.revoked_at) >= since
                )
            ).all()
        revocations = {}
        for agent_id, revoked_at in rows:
            moment = as_utc(revoked_at)
            assert moment is not None
            revocations[self.keys.agent_user(agent_id).public_key] = (
                int(moment.timestamp()) + self._revocation_margin
            )
        with self._lock:
            self._revocations = dict(revocations)
        return revocations

    def account_jwt(self, revocations: dict[str, int]) -> str:
        """The account JWT with `revocations`, issued later than the last one: nodes ignore a JWT
        with the `jti` they hold, which one issued in the same second would repeat."""
        with self._lock:
            issued_at = max(int(time.time()), self._last_account_iat + 1)
            self._last_account_iat = issued_at
            now = int(time.time())
            margin = self._revocation_margin  # kept until every JWT it revokes has expired
            self._quarantined = {k: t for k, t in self._quarantined.items() if t + margin > now}
            revocations = {**self._quarantined, **revocations}
        return credentials.account_jwt(self.keys, revocations=revocations, issued_at=issued_at)

    def _push(self, revocations: dict[str, int]) -> None:
        """Send the account JWT to the cluster through the system account; `BrokerUnavailable` when no
        node stored it (the reconcile round is retried)."""
        token = self.account_jwt(revocations)
        urls = self.settings.nats_url_list
        replies = request_any(
            urls,
            CLAIMS_UPDATE,
            token.encode(),
            expected=len(urls),
            user_jwt=credentials.system_user_jwt(self.keys),
            user_key=self.keys.system_user,
            ssl_context=self._context(),
            timeout=PUSH_TIMEOUT_S,
        )
        stored: list[tuple[str, object]] = []
        refused: list[tuple[str, object]] = []
        for reply in replies:
            answer = orjson.loads(reply.payload)
            server = answer.get("server", {}).get("name", "?")
            (refused if "error" in answer else stored).append(
                (server, answer.get("error") or answer.get("data"))
            )
        if refused or not stored:
            raise BrokerUnavailable(
                f"the account update was not stored: refused by {refused}, stored by {stored}"
            )
        if len(stored) < len(urls):
            log.warning(
                "account update stored by %d of %d node(s); the others sync from them", len(stored), len(urls)
            )
        log.info("pushed the account JWT (%d revocation(s)) to %d node(s)", len(revocations), len(stored))

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = client_context(manager_trust(self.settings))
        return self._ssl_context


def _local_host(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "") else "::1" if bind == "::" else bind
