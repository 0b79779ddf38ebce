"""The outbox relay: changed documents and operator commands, from SQL to the broker, losing nothing.

A row is marked published only after the broker acknowledged it (QoS 1 PUBACK). A bridge killed between
the publish and the mark publishes the row again after a restart: agents drop a serial they already hold,
so a duplicate is harmless, a loss is not. When several rows wait for the same topic, only the newest
is published (the older ones are superseded: it is retained state, not a log). A row with an empty
envelope clears the retained document of a (group, location) that no longer exists.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from broker_bridge.broker import Publication
from fabric_core.canonical import canonical_json
from fabric_core.topics import cmd_topic, config_topic
from fabric_core.wire import AgentCommand
from manager_db.models import AgentCommandEntry, EffectiveConfig, OutboxEntry, as_utc, utcnow

log = logging.getLogger(__name__)


class Publisher(Protocol):
    def publish_many(self, messages: Sequence[Publication], *, timeout: float) -> None:
        """Return once the broker acknowledged every message; raise if it did not."""
        ...


def relay_outbox(engine: Engine, publisher: Publisher, *, prefix: str, batch: int, timeout: float) -> int:
    """Publish the oldest pending documents; return how many outbox rows were settled."""
    with Session(engine) as session:
        rows = session.exec(  # plain rows, not ORM objects: a fleet-wide change has thousands
            select(
                col(OutboxEntry.id),
                col(OutboxEntry.group_id),
                col(OutboxEntry.location_id),
                OutboxEntry.envelope,
            )
            .where(col(OutboxEntry.published_at).is_(None))
            .order_by(col(OutboxEntry.id))
            .limit(batch)
        ).all()
    if not rows:
        return 0
    newest: dict[tuple[int, int], tuple[int, bytes]] = {}
    for row_id, group_id, location_id, envelope in rows:  # ascending id is ascending serial: the last wins
        newest[(group_id, location_id)] = (int(row_id or 0), bytes(envelope))
    messages = [
        Publication(config_topic(prefix, group_id, location_id), envelope, qos=1, retain=True)
        for (group_id, location_id), (_, envelope) in sorted(newest.items(), key=lambda item: item[1][0])
    ]
    publisher.publish_many(messages, timeout=timeout)
    _mark(engine, OutboxEntry, [int(row_id) for row_id, *_ in rows if row_id is not None])
    log.debug("published %d document(s), settled %d outbox row(s)", len(messages), len(rows))
    return len(rows)


def republish_current(engine: Engine, publisher: Publisher, *, prefix: str, timeout: float) -> int:
    """Publish every current document again, retained.

    Mosquitto saves retained messages periodically; one that crashed may come back without the latest
    documents. Republishing after each reconnect restores them (agents drop what they already hold).
    """
    with Session(engine) as session:
        rows = session.exec(select(EffectiveConfig).order_by(col(EffectiveConfig.serial))).all()
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        publisher.publish_many(
            [
                Publication(config_topic(prefix, r.group_id, r.location_id), r.envelope, 1, True)
                for r in chunk
            ],
            timeout=timeout,
        )
    return len(rows)


def relay_commands(engine: Engine, publisher: Publisher, *, prefix: str, batch: int, timeout: float) -> int:
    """Publish pending operator commands to the agents' cmd topics (QoS 1, not retained)."""
    with Session(engine) as session:
        rows = session.exec(
            select(AgentCommandEntry)
            .where(col(AgentCommandEntry.published_at).is_(None))
            .order_by(col(AgentCommandEntry.id))
            .limit(batch)
        ).all()
    if not rows:
        return 0
    messages = [
        Publication(cmd_topic(prefix, row.agent_id), _command_payload(row), qos=1, retain=False)
        for row in rows
    ]
    publisher.publish_many(messages, timeout=timeout)
    _mark(engine, AgentCommandEntry, [row.id for row in rows if row.id is not None])
    return len(rows)


def _command_payload(row: AgentCommandEntry) -> bytes:
    command = AgentCommand(
        command="update_now", id=f"{row.id}-{uuid.uuid4().hex[:8]}", issued_at=as_utc(row.created_at)
    )
    return canonical_json(command.model_dump(mode="json"))


def _mark(engine: Engine, table: type[OutboxEntry] | type[AgentCommandEntry], ids: list[int]) -> None:
    published: datetime = utcnow()
    with Session(engine) as session:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            session.execute(update(table).where(col(table.id).in_(chunk)).values(published_at=published))
        session.commit()
