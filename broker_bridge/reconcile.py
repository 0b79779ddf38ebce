"""Broker accounts follow the agents table: one account per active agent, reading only its group.

The api never talks to the broker: it records agents (enrolled, moved, revoked) and hands out what the
broker engine says an agent connects with. Each round the lease-holding bridge finds the agents whose
broker access is not what the table says (`acl_group_id` differs from `group_id`, or a revoked agent
still has one), has the engine fix it, and records what the broker now allows. Idempotent, so a crash
mid-round is harmless.
"""

from __future__ import annotations

import logging

from sqlalchemy import ColumnElement, Engine, and_, or_, update
from sqlmodel import Session, col, select

from broker_bridge.broker import BrokerLink
from broker_bridge.engine import BrokerEngine
from manager_db.models import Agent

log = logging.getLogger(__name__)


def reconcile_accounts(engine: Engine, link: BrokerLink, *, broker: BrokerEngine, batch: int = 200) -> int:
    """Bring up to `batch` broker accounts in line with the agents table; return how many changed."""
    with Session(engine) as session:
        drifted = session.exec(
            select(Agent)
            .where(
                or_(
                    and_(
                        col(Agent.revoked_at).is_(None),
                        or_(
                            col(Agent.acl_group_id).is_(None), col(Agent.acl_group_id) != col(Agent.group_id)
                        ),
                    ),
                    and_(col(Agent.revoked_at).is_not(None), col(Agent.acl_group_id).is_not(None)),
                )
            )
            .limit(batch)
        ).all()
    broker.resync(link, database=engine)
    revoked = [agent for agent in drifted if agent.revoked_at is not None]
    if revoked:
        # One removal for the round: an engine that rewrites one list (NATS's revocations) pushes once.
        broker.remove_many(link, [agent.id for agent in revoked], database=engine)
        log.info("removed the broker access of %d revoked agent(s)", len(revoked))
        _record_many(engine, [(agent.id, agent.acl_group_id, None) for agent in revoked])
    for agent in drifted:
        if agent.revoked_at is None:
            _fix(link, agent, broker=broker)
            _record(engine, agent.id, was=agent.acl_group_id, now=agent.group_id)
    return len(drifted)


def _fix(link: BrokerLink, agent: Agent, *, broker: BrokerEngine) -> None:
    if agent.acl_group_id is None:
        broker.provision(link, agent_id=agent.id, group_id=agent.group_id)
        log.info("provisioned broker access for agent %s (group %d)", agent.id, agent.group_id)
    else:
        broker.move(link, agent_id=agent.id, old_group_id=agent.acl_group_id, new_group_id=agent.group_id)
        log.info("moved agent %s's broker access to group %d", agent.id, agent.group_id)


def _record(engine: Engine, agent_id: str, *, was: int | None, now: int | None) -> None:
    _record_many(engine, [(agent_id, was, now)])


def _record_many(engine: Engine, changes: list[tuple[str, int | None, int | None]]) -> None:
    """(agent id, was, now) for each agent, in one transaction."""
    with Session(engine) as session:
        for agent_id, was, now in changes:
            statement = update(Agent).where(col(Agent.id) == agent_id, _same(was)).values(acl_group_id=now)
            session.execute(statement)
        session.commit()


def active_agents(engine: Engine) -> list[tuple[str, int, int | None]]:
    """(id, group_id, acl_group_id) of every agent not revoked: what a bulk write of broker accounts
    covers (`broker_bridge.mosquitto.bulk`)."""
    with Session(engine) as session:
        rows = session.exec(
            select(Agent.id, Agent.group_id, Agent.acl_group_id).where(col(Agent.revoked_at).is_(None))
        ).all()
    return [(agent_id, group_id, acl_group_id) for agent_id, group_id, acl_group_id in rows]


def record_provisioned(engine: Engine, agents: list[tuple[str, int, int | None]]) -> None:
    """Record that these agents (as `active_agents` read them) now have broker access to their group,
    as a round records one it provisioned, so that no round provisions them again. An agent whose
    `acl_group_id` changed since is left alone (a round then fixes it)."""
    _record_many(engine, [(agent_id, was, group_id) for agent_id, group_id, was in agents])


def _same(value: int | None) -> ColumnElement[bool]:
    """`acl_group_id` still is what this round read (so a concurrent change is not overwritten)."""
    column = col(Agent.acl_group_id)
    return column.is_(None) if value is None else column == value
