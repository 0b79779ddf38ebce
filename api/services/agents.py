"""Agents: enrolment tokens, enrolment, the operator's view, moves, revocation and update-now."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, func, select

from api.errors import Conflict, Invalid, NotFound, Unauthorized
from api.resolution import load_tree
from api.security import hash_secret, new_secret
from api.services.change import Change
from api.services.fleet import CURRENT_SERIAL, ONLINE_GRACE_S, presence, with_current_document
from api.services.groups import get_group
from manager_db.models import Agent, AgentCommandEntry, EnrollmentToken, as_utc, utcnow


def create_enrollment_token(
    change: Change, *, group_id: int, expires_in_s: int, max_uses: int | None
) -> tuple[str, EnrollmentToken]:
    get_group(change.session, group_id=group_id)
    token = new_secret("pcet")
    row = EnrollmentToken(
        token_hash=hash_secret(token),
        group_id=group_id,
        expires_at=utcnow() + timedelta(seconds=expires_in_s),
        max_uses=max_uses,
    )
    change.session.add(row)
    change.session.flush()
    change.audit("token.create", f"group:{group_id}", token_id=row.id, expires_in_s=expires_in_s)
    return token, row


@dataclass(frozen=True)
class Enrolment:
    agent: Agent
    secret: str


def enroll(
    change: Change, *, token: str, hostname: str, facts: dict[str, Any], access_granted: bool = False
) -> Enrolment:
    """A new agent in the token's group. `access_granted`: its broker credentials carry its group's
    access (NATS), recorded as such so that the bridge provisions nothing and a move re-scopes it."""
    row = change.session.exec(
        select(EnrollmentToken).where(col(EnrollmentToken.token_hash) == hash_secret(token))
    ).first()
    if row is None:
        raise Unauthorized("unknown enrollment token")
    if as_utc(row.expires_at) <= utcnow():
        raise Unauthorized("enrollment token expired")
    if row.max_uses is not None and row.uses >= row.max_uses:
        raise Unauthorized("enrollment token already used up")
    row.uses += 1
    secret = new_secret("pcas")
    agent = Agent(
        id=uuid.uuid4().hex,
        hostname=hostname,
        group_id=row.group_id,
        secret_hash=hash_secret(secret),
        facts=facts,
        generation=change.generation,
        acl_group_id=row.group_id if access_granted else None,
    )
    change.session.add_all([row, agent])
    change.audit("agent.enroll", f"agent:{agent.id}", group_id=row.group_id, hostname=hostname)
    change.session.flush()
    return Enrolment(agent=agent, secret=secret)


def list_agents(session: Session, *, group_id: int | None, limit: int, offset: int) -> list[Agent]:
    query = select(Agent).order_by(col(Agent.enrolled_at), col(Agent.id)).limit(limit).offset(offset)
    if group_id is not None:
        query = query.where(col(Agent.group_id) == group_id)
    return list(session.exec(query).all())


def count_agents(session: Session, *, group_id: int) -> int:
    """The group's agents that are not revoked."""
    query = select(func.count()).select_from(Agent)
    return session.exec(query.where(col(Agent.group_id) == group_id, col(Agent.revoked_at).is_(None))).one()


def get_agent(session: Session, *, agent_id: str) -> Agent:
    agent = None if "\x00" in agent_id else session.get(Agent, agent_id)
    if agent is None:
        raise NotFound(f"agent {agent_id} does not exist")
    return agent


def current_serials(session: Session, agents: list[Agent]) -> dict[str, int | None]:
    """The serial each agent should hold: its (group, location) document, or its group's Default
    (`api.services.fleet.with_current_document`, the rule the metrics count by too)."""
    found: dict[str, int | None] = {}
    ids = [agent.id for agent in agents]
    for start in range(0, len(ids), 500):
        query = select(col(Agent.id), CURRENT_SERIAL).where(col(Agent.id).in_(ids[start : start + 500]))
        found.update(session.exec(with_current_document(query)).all())
    return {agent.id: found.get(agent.id) for agent in agents}


def is_online(
    agent: Agent, *, heartbeat_s: int, jitter: float, now: datetime, grace_s: int = ONLINE_GRACE_S
) -> bool:
    """Push agents are online while the broker says so (their last will says when not); pull agents
    while their last heartbeat is no older than their interval, its jitter and a grace."""
    return presence(
        mode=agent.mode,
        online=agent.online,
        last_seen=agent.last_seen,
        revoked=agent.revoked_at is not None,
        heartbeat_s=heartbeat_s,
        jitter=jitter,
        now=now,
        grace_s=grace_s,
    )


def move_agent(change: Change, *, agent_id: str, group_id: int) -> Agent:
    agent = _active(change.session, agent_id)
    get_group(change.session, group_id=group_id)
    change.audit("agent.move", f"agent:{agent_id}", old_group_id=agent.group_id, new_group_id=group_id)
    agent.group_id = group_id
    agent.location_id = None
    # "Update now": the agent heartbeats at once and gets its new group's document (and, on NATS,
    # credentials for the new group's topics), instead of at its next heartbeat.
    _queue_update(change, agent)
    return agent


def revoke_agent(change: Change, *, agent_id: str) -> Agent:
    agent = _active(change.session, agent_id)
    agent.revoked_at = utcnow()
    agent.generation = change.generation
    change.session.add(agent)
    change.audit("agent.revoke", f"agent:{agent_id}")
    return agent


def request_update(change: Change, *, agent_id: str) -> Agent:
    """Update now: a push agent hears it at once on its cmd topic, a pull agent at its next heartbeat."""
    agent = _active(change.session, agent_id)
    _queue_update(change, agent)
    change.audit("agent.update_now", f"agent:{agent_id}")
    return agent


def request_group_update(change: Change, *, group_id: int) -> list[Agent]:
    """Update now for every active agent of the group and of its subgroups."""
    get_group(change.session, group_id=group_id)
    subtree = load_tree(change.session).subtree(group_id)
    agents = list(
        change.session.exec(
            select(Agent).where(col(Agent.group_id).in_(subtree), col(Agent.revoked_at).is_(None))
        ).all()
    )
    for agent in agents:
        _queue_update(change, agent)
    change.audit("group.update_now", f"group:{group_id}", agents=len(agents))
    return agents


def _queue_update(change: Change, agent: Agent) -> None:
    agent.update_requested = True
    agent.generation = change.generation
    change.session.add(agent)
    change.session.add(AgentCommandEntry(agent_id=agent.id, command="update_now"))


def _active(session: Session, agent_id: str) -> Agent:
    agent = get_agent(session, agent_id=agent_id)
    if agent.revoked_at is not None:
        raise Conflict(f"agent {agent_id} is revoked")
    return agent


def validate_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= 1000 or offset < 0:
        raise Invalid("limit must be 1..1000 and offset >= 0")
