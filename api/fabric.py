"""`Fabric`: what a manager process holds for its whole life, made once in the app's lifespan.

The broker engine is not the api's to choose: the composition root (`local_stack.composition`) hands
`create_app` a factory for it, and enrolment and the heartbeat (renewed credentials) talk to it only
through `BrokerAccess`, the part of the engine's interface (`broker_bridge.engine.BrokerEngine`) that
the api needs. The api alone (no
factory) enrols agents without broker credentials: they converge by heartbeat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from api.heartbeat.ledger import HeartbeatLedger
from api.heartbeat.view import FabricView
from api.key_cache import ApiKeyCache
from api.metrics import ApiMetrics
from api.services.agents import is_online
from api.services.change import Change
from api.services.groups import ensure_root
from api.services.trust import trust_ca
from fabric_core.settings import DEFAULT_HEARTBEAT_S, Settings
from fabric_core.signing import SigningKey, load_signing_key
from fabric_core.tls import ManagerTls, manager_tls, split_certificates
from fabric_core.wire import MqttCredentials
from manager_db.database import make_engine, migrate, session_scope
from manager_db.models import Agent


class BrokerAccess(Protocol):
    """What enrolment and the heartbeat ask of the broker engine."""

    @property
    def access_in_credentials(self) -> bool:
        """True: the credentials carry the agent's access (NATS JWTs), so an enrolled agent has its
        group's access at once and the bridge provisions nothing (enrolment records it as granted)."""
        ...

    def enrolment_credentials(self, agent_id: str, group_id: int) -> MqttCredentials:
        """The broker URL, account and delivery options a newly enrolled agent connects with."""
        ...

    def refreshed_credentials(
        self, agent_id: str, group_id: int, *, expires_at: int | None, document_changed: bool
    ) -> MqttCredentials | None:
        """New credentials for the heartbeat's answer, when the agent's (expiring at `expires_at`, Unix
        seconds, as it reported) are due for renewal or no longer fit its document (`document_changed`:
        the answer carries a new document, e.g. after a group move); None: keep what it has (Mosquitto,
        whose passwords never expire). Called on the event loop, only for heartbeats that report an
        expiry: it must be quick (a JWT is minted in about 100 µs) and never block."""
        ...


BrokerAccessFactory = Callable[[Settings, SigningKey], BrokerAccess]


@dataclass
class Fabric:
    """What a manager process holds for its whole life; built in the lifespan, never global."""

    settings: Settings
    engine: Engine
    signing_key: SigningKey
    view: FabricView
    ledger: HeartbeatLedger
    keys: ApiKeyCache
    """The API keys, in memory, reloaded with the view (`FabricView.refresh`)."""
    metrics: ApiMetrics
    """What `/metrics` serves: counted by the heartbeat, enrolment and credentials, read from SQL."""
    broker: BrokerAccess | None = None
    """None: push is off (`mqtt_enabled` false, or no broker engine composed in)."""
    tls: ManagerTls | None = None
    """The CA and certificate this manager serves with; None when it serves plain HTTP
    (`tls_enabled` false, behind a TLS-terminating proxy)."""

    def agent_online(self, agent: Agent, *, now: datetime) -> bool:
        """Whether operators see `agent` online (`services.agents.is_online`), a pull agent's heartbeat
        judged by the interval of the document it should hold (the default before there is one)."""
        cached = self.view.document_for(agent.group_id, agent.location_id)
        heartbeat_s = cached[1].heartbeat_s if cached else DEFAULT_HEARTBEAT_S
        return is_online(agent, heartbeat_s=heartbeat_s, jitter=self.settings.heartbeat_jitter, now=now)


def open_fabric(
    settings: Settings, *, run_migrations: bool = True, broker: BrokerAccessFactory | None = None
) -> Fabric:
    """Connect, migrate, make sure the root group exists, and load the heartbeat view and the keys."""
    engine = make_engine(settings.resolved_database_url)
    if run_migrations:
        migrate(engine)
    signing_key = load_signing_key(settings)
    with session_scope(engine) as session:
        change = Change(session=session, actor="system", signing_key=signing_key)
        ensure_root(change)
        change.commit()
    tls = manager_tls(settings) if settings.tls_enabled else None
    if tls is not None:
        _trust_own_ca(engine, signing_key, tls)
    bootstrap = settings.bootstrap_admin_key
    keys = ApiKeyCache(engine, bootstrap.get_secret_value() if bootstrap else None)
    view = FabricView(engine, followers=[keys.reload])
    view.refresh()
    metrics = ApiMetrics(engine, jitter=settings.heartbeat_jitter, cache_s=settings.metrics_cache_s)
    return Fabric(
        settings=settings,
        engine=engine,
        signing_key=signing_key,
        view=view,
        ledger=HeartbeatLedger(on_advances=metrics.convergence.observe),
        keys=keys,
        metrics=metrics,
        tls=tls,
        broker=broker(settings, signing_key) if broker is not None and settings.mqtt_enabled else None,
    )


def _trust_own_ca(engine: Engine, signing_key: SigningKey, tls: ManagerTls) -> None:
    """Make sure every document names the CA this manager's certificates chain to (agents must trust
    the servers they talk to). Replicas starting at once may race to add it: one wins, the others
    find it there."""
    for certificate in split_certificates(tls.trust_pem):
        try:
            with session_scope(engine) as session:
                change = Change(session=session, actor="system", signing_key=signing_key)
                trust_ca(change, pem=certificate)
                change.commit()
        except IntegrityError:
            continue  # another replica added it first
