"""Log batches uploaded with heartbeats: stored exactly once per (agent, batch id)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, or_, select

from fabric_core.wire import LogBatch
from manager_db.models import Agent, LogBatchReceipt, LogRecord


def _utc(moment: datetime) -> datetime:
    """The same instant in UTC (naive: taken as UTC). SQLite keeps no offset, so store and compare in UTC."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def store_log_batch(session: Session, *, agent_id: str, group_id: int, batch: LogBatch) -> bool:
    """Store a batch; False if this agent already uploaded a batch with this id (a retry)."""
    if session.get(LogBatchReceipt, (agent_id, batch.batch_id)) is not None:
        return False
    session.add(LogBatchReceipt(agent_id=agent_id, batch_id=batch.batch_id, entries=len(batch.entries)))
    session.add_all(
        LogRecord(
            agent_id=agent_id,
            group_id=group_id,
            batch_id=batch.batch_id,
            ts=_utc(entry.ts),
            level=entry.level,
            category=entry.category,
            message=entry.message,
            data=entry.data,
        )
        for entry in batch.entries
    )
    try:
        session.commit()
    except IntegrityError:  # the same batch raced in through another request or replica
        session.rollback()
        return False
    return True


def query_logs(
    session: Session,
    *,
    agent_id: str | None = None,
    group_id: int | None = None,
    level: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    category: str | None = None,
    client: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[LogRecord]:
    """Log records, newest first. `client`: an agent id or a host name (host names need not be unique:
    the logs of every agent by that name)."""
    query = select(LogRecord)
    if agent_id is not None:
        query = query.where(col(LogRecord.agent_id) == agent_id)
    if client is not None:
        named = select(Agent.id).where(col(Agent.hostname) == client)
        query = query.where(or_(col(LogRecord.agent_id) == client, col(LogRecord.agent_id).in_(named)))
    if category is not None:
        query = query.where(col(LogRecord.category) == category)
    if group_id is not None:
        query = query.where(col(LogRecord.group_id) == group_id)
    if level is not None:
        query = query.where(col(LogRecord.level) == level)
    if since is not None:
        query = query.where(col(LogRecord.ts) >= _utc(since))
    if until is not None:
        query = query.where(col(LogRecord.ts) < _utc(until))
    query = query.order_by(col(LogRecord.ts).desc(), col(LogRecord.id).desc()).limit(limit).offset(offset)
    return list(session.exec(query).all())


def hostnames(session: Session, *, agent_ids: set[str]) -> dict[str, str]:
    """The host name of each of these agents (revoked ones too: their logs stay)."""
    if not agent_ids:
        return {}
    rows = session.exec(select(Agent.id, Agent.hostname).where(col(Agent.id).in_(sorted(agent_ids)))).all()
    return dict(rows)
