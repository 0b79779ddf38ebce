"""The fleet in numbers, in SQL: each agent's current document, and agents counted by state.

An agent's current document is the one of its (group, location), or its group's Default when it has
reported no location or one that is gone (`with_current_document`): the one rule the operator's view
(`api.services.agents.current_serials`), the metrics (`api.metrics`) and the convergence summaries
(`api.services.convergence`) all read, as a join, so that a fleet of 10,000 costs one query.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import Select, and_, func, select
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from fabric_core.settings import DEFAULT_HEARTBEAT_S
from manager_db.models import Agent, EffectiveConfig, as_utc

S = TypeVar("S", bound=Select)  # type: ignore[type-arg]

_EXACT = aliased(EffectiveConfig, name="exact_document")
_DEFAULT = aliased(EffectiveConfig, name="default_document")
CURRENT_SERIAL = func.coalesce(_EXACT.serial, _DEFAULT.serial)
"""The serial of the agent's current document (NULL: its group has no document)."""
CURRENT_HEARTBEAT_S = func.coalesce(_EXACT.heartbeat_s, _DEFAULT.heartbeat_s, DEFAULT_HEARTBEAT_S)


def with_current_document(query: S) -> S:
    """`query`, over `agents`, joined to each agent's current document (`CURRENT_SERIAL`, ...)."""
    exact = and_(
        col(_EXACT.group_id) == col(Agent.group_id), col(_EXACT.location_id) == col(Agent.location_id)
    )
    default = and_(col(_DEFAULT.group_id) == col(Agent.group_id), col(_DEFAULT.is_default).is_(True))
    return query.outerjoin(_EXACT, exact).outerjoin(_DEFAULT, default)


ONLINE_GRACE_S = 30
"""How late a pull agent's heartbeat may be, beyond its interval and jitter, before it counts as
offline."""


def presence(
    *,
    mode: str,
    online: bool | None,
    last_seen: datetime | None,
    revoked: bool,
    heartbeat_s: int,
    jitter: float,
    now: datetime,
    grace_s: int = ONLINE_GRACE_S,
) -> bool:
    """Whether an agent is online: a push agent while the broker says so (its last will says when
    not), any other while its last heartbeat is no older than its interval, its jitter and a grace.
    On columns, not an `Agent`: the metrics count a fleet from plain rows."""
    if revoked:
        return False
    if mode == "push" and online is not None:
        return online
    seen = as_utc(last_seen)
    return seen is not None and now - seen <= timedelta(seconds=heartbeat_s * (1 + jitter) + grace_s)


@dataclass(frozen=True)
class FleetCounts:
    """Agents that are not revoked, counted by state."""

    online: int = 0
    offline: int = 0
    push: int = 0
    pull: int = 0
    up_to_date: int = 0
    """Holding their current document's serial, or a later one."""
    out_of_date: int = 0
    """Every other: behind their document, or in a group with none."""


def fleet_counts(session: Session, *, jitter: float, now: datetime) -> FleetCounts:
    """Count the fleet in one query: the columns of each agent, counted here (presence depends on
    each agent's heartbeat interval, which SQL cannot compare portably)."""
    query = with_current_document(
        select(  # SQLAlchemy's: sqlmodel's takes four columns at most
            col(Agent.mode),
            col(Agent.online),
            col(Agent.last_seen),
            col(Agent.serial),
            CURRENT_SERIAL,
            CURRENT_HEARTBEAT_S,
        ).where(col(Agent.revoked_at).is_(None))
    )
    online = push = pull = up_to_date = total = 0
    for mode, pushed_online, last_seen, serial, current, heartbeat_s in session.execute(query).all():
        total += 1
        if presence(
            mode=mode,
            online=pushed_online,
            last_seen=last_seen,
            revoked=False,
            heartbeat_s=int(heartbeat_s),
            jitter=jitter,
            now=now,
        ):
            online += 1
        if mode == "push":
            push += 1
        elif mode == "pull":
            pull += 1
        if current is not None and serial >= current:
            up_to_date += 1
    return FleetCounts(
        online=online,
        offline=total - online,
        push=push,
        pull=pull,
        up_to_date=up_to_date,
        out_of_date=total - up_to_date,
    )
