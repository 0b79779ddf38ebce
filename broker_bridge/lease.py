"""A lease in SQL: at most one bridge relays at a time, so documents leave in serial order.

Several bridges may run (for availability); the one holding the lease relays and provisions, the
others ingest agent state and stand by. A holder that stops renewing loses the lease after `ttl`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import CursorResult, Engine, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from manager_db.models import BridgeLease, utcnow

RELAY_LEASE = "relay"


def acquire(engine: Engine, *, holder: str, ttl_s: float, name: str = RELAY_LEASE) -> bool:
    """Take or renew the lease; True if `holder` holds it until now + ttl."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    with Session(engine) as session:
        result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            update(BridgeLease)
            .where(
                col(BridgeLease.name) == name,
                or_(col(BridgeLease.holder) == holder, col(BridgeLease.expires_at) < now),
            )
            .values(holder=holder, expires_at=expires)
        )
        if result.rowcount:
            session.commit()
            return True
        try:
            with session.begin_nested():
                session.add(BridgeLease(name=name, holder=holder, expires_at=expires))
            session.commit()
        except IntegrityError:  # someone else holds it
            session.rollback()
            return False
        return True


def release(engine: Engine, *, holder: str, name: str = RELAY_LEASE) -> None:
    with Session(engine) as session:
        session.execute(
            update(BridgeLease)
            .where(col(BridgeLease.name) == name, col(BridgeLease.holder) == holder)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
