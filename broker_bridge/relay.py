"""The outbox relay: changed documents and operator commands, from SQL to the broker, losing nothing.

A row is marked published only after the broker acknowledged it (QoS 1 PUBACK). A bridge killed between
the publish and the mark publishes the row again after a restart: agents drop a serial they already hold,
so a duplicate is harmless, a loss is not. When several rows wait for the same topic, only the newest
is published (the older ones are superseded: it is retained state, not a log). A row with an empty
envelope clears the retained document of a (group, location) that no longer exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import Engine, update
from sqlalchemy import select as columns_of  # sqlmodel's `select` takes four columns at most
from sqlmodel import Session, col, select

from broker_bridge.broker import Publication
from fabric_core.canonical import canonical_json
from fabric_core.topics import cmd_topic, config_topic
from fabric_core.wire import AgentCommand
from manager_db.models import Agent, AgentCommandEntry, EffectiveConfig, OutboxEntry, as_utc, utcnow

log = logging.getLogger(__name__)

COMMAND_GIVE_UP_S = 600.0
"""How long an unanswered command is sent again: after that the agent's next heartbeat serves it."""


class Publisher(Protocol):
    def publish_many(self, messages: Sequence[Publication], *, timeout: float) -> None:
        """Return once the broker acknowledged every message; raise if it did not."""
        ...


def relay_outbox(
    engine: Engine,
    publisher: Publisher,
    *,
    prefix: str,
    batch: int,
    timeout: float,
    on_published: Callable[[list[tuple[int, int]]], None] | None = None,
    on_acknowledged: Callable[[list[float]], None] | None = None,
) -> int:
    """Publish the oldest pending documents; return how many outbox rows were settled.

    `on_published` hears which (group, location) topics went out (anti-entropy times its grace from
    then); `on_acknowledged` how many seconds after its row was made the broker acknowledged each
    document published (the metrics' publish latency; a superseded row was not published)."""
    with Session(engine) as session:
        rows = session.execute(  # plain rows, not ORM objects: a fleet-wide change has thousands
            columns_of(
                col(OutboxEntry.id),
                col(OutboxEntry.group_id),
                col(OutboxEntry.location_id),
                col(OutboxEntry.envelope),
                col(OutboxEntry.created_at),
            )
            .where(col(OutboxEntry.published_at).is_(None))
            .order_by(col(OutboxEntry.id))
            .limit(batch)
        ).all()
    if not rows:
        return 0
    newest: dict[tuple[int, int], tuple[int, bytes, datetime]] = {}
    for row_id, group_id, location_id, envelope, created_at in rows:  # ascending id: the last wins
        newest[(group_id, location_id)] = (int(row_id or 0), bytes(envelope), created_at)
    messages = [
        Publication(config_topic(prefix, group_id, location_id), envelope, qos=1, retain=True)
        for (group_id, location_id), (_, envelope, _) in sorted(newest.items(), key=lambda item: item[1][0])
    ]
    publisher.publish_many(messages, timeout=timeout)
    acknowledged = utcnow()
    if on_published is not None:
        on_published(list(newest))
    if on_acknowledged is not None:
        on_acknowledged([(acknowledged - as_utc(made)).total_seconds() for _, _, made in newest.values()])
    _mark(engine, OutboxEntry, [int(row_id) for row_id, *_ in rows if row_id is not None])
    log.debug("published %d document(s), settled %d outbox row(s)", len(messages), len(rows))
    return len(rows)


def republish_current(
    engine: Engine,
    publisher: Publisher,
    *,
    prefix: str,
    timeout: float,
    only: Collection[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Publish the current documents again, retained: every one, or those of the (group, location)
    topics in `only`; return the topics published.

    Mosquitto saves retained messages periodically; one that crashed may come back without the latest
    documents, and a NATS node may lose or hide a retained update in a failover. Republishing restores
    them (agents drop what they already hold): after each reconnect, and for anti-entropy.
    """
    with Session(engine) as session:
        rows = session.exec(
            select(
                col(EffectiveConfig.group_id), col(EffectiveConfig.location_id), EffectiveConfig.envelope
            ).order_by(col(EffectiveConfig.serial))
        ).all()
    wanted = None if only is None else set(only)
    chosen = [row for row in rows if wanted is None or (row[0], row[1]) in wanted]
    for start in range(0, len(chosen), 500):
        publisher.publish_many(
            [
                Publication(config_topic(prefix, group_id, location_id), bytes(envelope), 1, True)
                for group_id, location_id, envelope in chosen[start : start + 500]
            ],
            timeout=timeout,
        )
    return [(group_id, location_id) for group_id, location_id, _ in chosen]


def relay_commands(engine: Engine, publisher: Publisher, *, prefix: str, batch: int, timeout: float) -> int:
    """Publish pending operator commands to the agents' cmd topics (QoS 1, not retained)."""
    with Session(engine) as session:
        rows = session.exec(
            select(AgentCommandEntry)
            .where(col(AgentCommandEntry.published_at).is_(None))
            .order_by(col(AgentCommandEntry.id))
            .limit(batch)
        ).all()
    return _send_commands(engine, publisher, rows, prefix=prefix, timeout=timeout)


def resend_commands(
    engine: Engine,
    publisher: Publisher,
    *,
    prefix: str,
    after_s: float,
    give_up_s: float = COMMAND_GIVE_UP_S,
    batch: int = 500,
    timeout: float,
) -> int:
    """Send again the commands that online agents have not acted on `after_s` after they went out.

    On NATS commands travel at QoS 0 (a lost one is gone), and a persistent session can lose one in
    a failover: until the agent shows it acted (its "update now" was served by a heartbeat, which
    clears `update_requested`), the command goes out again, under the same id (agents act on an id
    once), every `after_s`, for `give_up_s` at most. Returns how many were sent.
    """
    now = utcnow()
    with Session(engine) as session:
        rows = session.exec(
            select(AgentCommandEntry)
            .join(Agent, col(Agent.id) == col(AgentCommandEntry.agent_id))
            .where(
                col(AgentCommandEntry.published_at).is_not(None),
                col(AgentCommandEntry.published_at) < now - timedelta(seconds=after_s),
                col(AgentCommandEntry.created_at) > now - timedelta(seconds=give_up_s),
                col(Agent.update_requested).is_(True),
                col(Agent.online).is_(True),
                col(Agent.revoked_at).is_(None),
            )
            .order_by(col(AgentCommandEntry.id))
            .limit(batch)
        ).all()
    sent = _send_commands(engine, publisher, rows, prefix=prefix, timeout=timeout)
    if sent:
        log.info("sent %d unanswered command(s) again", sent)
    return sent


def _send_commands(
    engine: Engine, publisher: Publisher, rows: Sequence[AgentCommandEntry], *, prefix: str, timeout: float
) -> int:
    """Publish the commands (QoS 1 from the bridge: the broker acknowledges them; agents receive at
    their own subscription's QoS), then mark them sent."""
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
    # The id is the row's: a command sent again is the same command, which an agent acts on once.
    command = AgentCommand(command="update_now", id=f"cmd-{row.id}", issued_at=as_utc(row.created_at))
    return canonical_json(command.model_dump(mode="json", exclude_none=True))


def _mark(engine: Engine, table: type[OutboxEntry] | type[AgentCommandEntry], ids: list[int]) -> None:
    published: datetime = utcnow()
    with Session(engine) as session:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            session.execute(update(table).where(col(table.id).in_(chunk)).values(published_at=published))
        session.commit()
