"""Read-only summaries for the command line (`policycast admin groups|agents`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine
from sqlmodel import Session, col, func, select

from api.services.agents import current_serials, list_agents
from manager_db.models import Agent, Group, as_utc


@dataclass(frozen=True)
class GroupRow:
    id: int
    name: str
    parent_id: int | None
    inherit: bool
    agents: int


@dataclass(frozen=True)
class AgentRow:
    id: str
    hostname: str
    group_name: str
    location_id: int | None
    mode: str
    serial: int
    current_serial: int | None
    last_seen: datetime | None
    revoked: bool


def group_tree(engine: Engine) -> list[GroupRow]:
    """Groups, parents before children."""
    with Session(engine) as session:
        counts = dict(
            session.exec(
                select(Agent.group_id, func.count())
                .where(col(Agent.revoked_at).is_(None))
                .group_by(col(Agent.group_id))
            ).all()
        )
        groups = session.exec(select(Group).order_by(col(Group.id))).all()
    by_parent: dict[int | None, list[Group]] = {}
    for group in groups:
        by_parent.setdefault(group.parent_id, []).append(group)
    ordered: list[GroupRow] = []
    frontier = list(reversed(by_parent.get(None, [])))
    while frontier:
        group = frontier.pop()
        assert group.id is not None
        ordered.append(
            GroupRow(group.id, group.name, group.parent_id, group.inherit, counts.get(group.id, 0))
        )
        frontier.extend(reversed(by_parent.get(group.id, [])))
    return ordered


def agent_rows(engine: Engine, *, group_id: int | None) -> list[AgentRow]:
    with Session(engine) as session:
        agents = list_agents(session, group_id=group_id, limit=1000, offset=0)
        serials = current_serials(session, agents)
        names = {g.id: g.name for g in session.exec(select(Group)).all()}
    return [
        AgentRow(
            id=a.id,
            hostname=a.hostname,
            group_name=names.get(a.group_id, str(a.group_id)),
            location_id=a.location_id,
            mode=a.mode,
            serial=a.serial,
            current_serial=serials[a.id],
            last_seen=as_utc(a.last_seen),
            revoked=a.revoked_at is not None,
        )
        for a in agents
    ]
