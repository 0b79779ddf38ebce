"""`Fabric`: what a manager process holds for its whole life, made once in the app's lifespan.

The broker engine is not the api's to choose: the composition root (`local_stack.composition`) hands
`create_app` a factory for it, and enrolment talks to it only through `BrokerAccess`, the part of the
engine's interface (`broker_bridge.engine.BrokerEngine`) that the api needs. The api alone (no
factory) enrols agents without broker credentials: they converge by heartbeat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine

from api.heartbeat.ledger import HeartbeatLedger
from api.heartbeat.view import FabricView
from api.services.change import Change
from api.services.groups import ensure_root
from fabric_core.settings import Settings
from fabric_core.signing import SigningKey, load_signing_key
from fabric_core.wire import MqttCredentials
from manager_db.database import make_engine, migrate, session_scope


class BrokerAccess(Protocol):
    """What enrolment asks of the broker engine."""

    def enrolment_credentials(self, agent_id: str, group_id: int) -> MqttCredentials:
        """The broker URL, account and delivery options a newly enrolled agent connects with."""
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
    broker: BrokerAccess | None = None
    """None: push is off (`mqtt_enabled` false, or no broker engine composed in)."""


def open_fabric(
    settings: Settings, *, run_migrations: bool = True, broker: BrokerAccessFactory | None = None
) -> Fabric:
    """Connect, migrate, make sure the root group exists, and load the heartbeat view."""
    engine = make_engine(settings.resolved_database_url)
    if run_migrations:
        migrate(engine)
    signing_key = load_signing_key(settings)
    with session_scope(engine) as session:
        change = Change(session=session, actor="system", signing_key=signing_key)
        ensure_root(change)
    view = FabricView(engine)
    view.refresh()
    return Fabric(
        settings=settings,
        engine=engine,
        signing_key=signing_key,
        view=view,
        ledger=HeartbeatLedger(),
        broker=broker(settings, signing_key) if broker is not None and settings.mqtt_enabled else None,
    )
