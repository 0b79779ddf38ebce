"""The audit trail: one row per operator change (`Change.audit`), read newest first."""

from __future__ import annotations

from sqlmodel import Session, col, select

from api.services.agents import validate_page
from manager_db.models import AuditEntry


def list_audit(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[AuditEntry]:
    """Audit rows, newest first; `actor` and `action` match exactly (e.g. `policy.update`)."""
    validate_page(limit, offset)
    query = select(AuditEntry)
    if actor is not None:
        query = query.where(col(AuditEntry.actor) == actor)
    if action is not None:
        query = query.where(col(AuditEntry.action) == action)
    query = query.order_by(col(AuditEntry.at).desc(), col(AuditEntry.id).desc()).limit(limit).offset(offset)
    return list(session.exec(query).all())


def actions(session: Session) -> list[str]:
    """Every action the trail holds, for a filter's list of choices."""
    return sorted(session.exec(select(AuditEntry.action).distinct()).all())


def actors(session: Session) -> list[str]:
    """Everyone who has changed something, for a filter's list of choices."""
    return sorted(session.exec(select(AuditEntry.actor).distinct()).all())
