"""How the recent changes converged: for the console, what `policycast_convergence_seconds` measures
as a histogram, per change.

A change (`ChangeRecord`) issued a range of serials. Its agents are those whose current document
(`api.services.fleet.with_current_document`) carries one of them: a later change to the same document
takes them over. Of those, the agents on serial hold it (or a later one); their convergence is from
the commit, or from their enrolment if they enrolled later, to when they first reported the serial
they hold (`agents.serial_at`). Two queries whatever the fleet: the changes with their first audit row,
and the agents of all of them at once.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from api.services.fleet import CURRENT_SERIAL, with_current_document
from manager_db.models import Agent, AuditEntry, ChangeRecord, as_utc


@dataclass(frozen=True)
class ChangeConvergence:
    generation: int
    committed_at: datetime
    actor: str
    action: str | None
    """The change's first audit row (e.g. `policy.update`), None if it wrote none."""
    target: str | None
    first_serial: int
    last_serial: int
    documents: int
    agents_total: int
    """Agents (not revoked) whose current document carries one of the change's serials."""
    agents_on_serial: int
    """Of those, the agents holding that serial or a later one."""
    p50_s: float | None
    """Median seconds to converge over `agents_on_serial`; None when no agent is on serial."""
    p99_s: float | None


def recent_changes(session: Session, *, limit: int = 10) -> list[ChangeConvergence]:
    """The latest `limit` changes that issued serials, newest first, with how far they reached."""
    first_audit = aliased(AuditEntry, name="first_audit")
    earliest = (
        select(func.min(AuditEntry.id))
        .where(col(AuditEntry.generation) == col(ChangeRecord.generation))
        .scalar_subquery()
    )
    changes = session.execute(
        select(ChangeRecord, col(first_audit.action), col(first_audit.target))
        .outerjoin(first_audit, col(first_audit.id) == earliest)
        .where(col(ChangeRecord.last_serial).is_not(None))
        .order_by(col(ChangeRecord.generation).desc())
        .limit(limit)
    ).all()
    if not changes:
        return []
    records = sorted((record for record, _, _ in changes), key=lambda record: record.first_serial or 0)
    starts = [record.first_serial or 0 for record in records]
    low, high = starts[0], max(record.last_serial or 0 for record in records)
    agents = session.execute(
        with_current_document(
            select(col(Agent.serial), col(Agent.serial_at), col(Agent.enrolled_at), CURRENT_SERIAL).where(
                col(Agent.revoked_at).is_(None), CURRENT_SERIAL.between(low, high)
            )
        )
    ).all()
    totals: dict[int, int] = {}
    latencies: dict[int, list[float]] = {}
    for serial, serial_at, enrolled_at, current in agents:
        index = bisect.bisect_right(starts, current) - 1
        if index < 0 or current > (records[index].last_serial or 0):
            continue  # a serial of a change older than these, or of one with no record
        record = records[index]
        totals[record.generation] = totals.get(record.generation, 0) + 1
        on_serial = latencies.setdefault(record.generation, [])
        if serial >= current and serial_at is not None:
            since = max(as_utc(record.committed_at), as_utc(enrolled_at))
            on_serial.append(max(0.0, (as_utc(serial_at) - since).total_seconds()))
        elif serial >= current:
            on_serial.append(math.nan)  # on serial since before serial_at was recorded: not timed
    return [
        _summary(
            record, action, target, totals.get(record.generation, 0), latencies.get(record.generation, [])
        )
        for record, action, target in changes
    ]


def _summary(
    record: ChangeRecord, action: str | None, target: str | None, total: int, on_serial: list[float]
) -> ChangeConvergence:
    timed = sorted(seconds for seconds in on_serial if not math.isnan(seconds))
    return ChangeConvergence(
        generation=record.generation,
        committed_at=as_utc(record.committed_at),
        actor=record.actor,
        action=action,
        target=target,
        first_serial=record.first_serial or 0,
        last_serial=record.last_serial or 0,
        documents=record.documents,
        agents_total=total,
        agents_on_serial=len(on_serial),
        p50_s=_percentile(timed, 0.50),
        p99_s=_percentile(timed, 0.99),
    )


def _percentile(ordered: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of an ordered list; None for an empty one."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
