"""The one statement that records an agent as seen, for heartbeat bookkeeping and the bridge's ingest.

Two observers write the same columns of `agents`: the api's heartbeat ledger (every heartbeat) and the
bridge's state ingest (every state message on the broker). Each passes what it observed; a field it
did not observe is None and keeps the stored value. Revoked agents are not updated.

The newer observation wins, column by column:

- `last_seen`, `serial`, `location_id` and `mode` take a sighting only if it is not older than the
  stored `last_seen`, whichever process wrote that;
- `serial_at` takes the sighting's time when it changes the serial: when the agent first reported
  the serial it holds;
- `status` (reported by heartbeats only, and only when it changed) takes a sighting's status only if
  it is not older than the stored status (`status_at`): a heartbeat flushed after a newer state
  message still records its status, which the agent will not send again;
- a served "update now" clears `update_requested` whatever the order.

`record_sightings` also tells which sightings *advanced* an agent: a serial above the one stored, at
the location stored, by an agent that held one already (`Advance`). That is the convergence SLO's
event (`manager_db.convergence`): an agent reached a change. It is decided in SQL, by an UPDATE that
writes the serial only where the stored one is lower and returns the rows it wrote, so that when both
processes see the same new serial (the heartbeat and the state message of one agent), only the first
to write it counts it: on PostgreSQL the second waits for the first's row lock and then finds the
serial already there; SQLite has one writer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Connection, DateTime, bindparam, text

_NEWER = "(last_seen IS NULL OR last_seen <= :seen)"
_NEWER_STATUS = "(:status IS NOT NULL AND (status_at IS NULL OR status_at <= :seen))"
# Every expression reads the row as it was before the UPDATE (SQLite and PostgreSQL alike).
AGENT_SEEN = text(
    "UPDATE agents SET "
    f"last_seen = CASE WHEN {_NEWER} THEN :seen ELSE last_seen END, "
    f"serial = CASE WHEN {_NEWER} THEN COALESCE(:serial, serial) ELSE serial END, "
    f"serial_at = CASE WHEN {_NEWER} AND serial <> COALESCE(:serial, serial) THEN :seen "
    "ELSE serial_at END, "
    f"location_id = CASE WHEN {_NEWER} THEN COALESCE(:location_id, location_id) ELSE location_id END, "
    f"mode = CASE WHEN {_NEWER} THEN COALESCE(:mode, mode) ELSE mode END, "
    f"status = CASE WHEN {_NEWER_STATUS} THEN :status ELSE status END, "
    f"status_at = CASE WHEN {_NEWER_STATUS} THEN :seen ELSE status_at END, "
    "update_requested = CASE WHEN :served_update THEN false ELSE update_requested END "
    "WHERE id = :id AND revoked_at IS NULL"
).bindparams(
    # none_as_null: a status not sent is SQL NULL (COALESCE keeps the stored one), not JSON 'null'
    bindparam("status", type_=JSON(none_as_null=True)),
    bindparam("seen", type_=DateTime(timezone=True)),
)

# The advance: the serial (and its time) of the agents whose stored serial is lower, at the stored
# location (a location switch or a group move lands on another document, not on a change). A stored
# serial 0 is an agent that held nothing: its first document is an enrolment, not a change reaching it.
# Its conditions are AGENT_SEEN's for writing the serial, and more: AGENT_SEEN, run after it, then
# finds these serials in place and leaves serial_at as this statement set it.
_ADVANCE = (
    "WITH reported(agent_id, reported_serial, reported_location, reported_at) AS (VALUES {rows}) "
    "UPDATE agents SET serial = reported_serial, serial_at = reported_at FROM reported "
    "WHERE agents.id = agent_id AND agents.revoked_at IS NULL "
    "AND (agents.last_seen IS NULL OR agents.last_seen <= reported_at) "
    "AND agents.serial > 0 AND agents.serial < reported_serial "
    "AND agents.location_id = COALESCE(reported_location, agents.location_id) "
    "RETURNING id"
)
_ROW = {"sqlite": "(?, ?, ?, ?)", "postgresql": "(%s::varchar, %s::bigint, %s::integer, %s::timestamptz)"}
"""One VALUES row in each driver's placeholders. The statement is written as text, not compiled from
SQLAlchemy's `values()` at every flush: compiling 2,000 rows cost four times the write itself."""
ADVANCE_CHUNK = 2000
"""Rows per advance statement: 4 parameters each, far below SQLite's 32,766 and PostgreSQL's 65,535."""


@dataclass(frozen=True, slots=True)
class Advance:
    """An agent reported a serial above the one it held, at `seen`: it reached the change that issued
    `serial`. Recorded once per agent and serial, whichever process saw it first."""

    agent_id: str
    serial: int
    seen: datetime


def sighting(
    agent_id: str,
    *,
    seen: datetime,
    serial: int | None = None,
    location_id: int | None = None,
    mode: str | None = None,
    status: dict[str, Any] | None = None,
    served_update: bool = False,
) -> dict[str, Any]:
    """The parameters of `AGENT_SEEN` for one agent; None leaves a column as it is."""
    return {
        "id": agent_id,
        "seen": seen,
        "serial": serial,
        "location_id": location_id,
        "mode": mode,
        "status": status,
        "served_update": served_update,
    }


def record_sightings(connection: Connection, rows: list[dict[str, Any]]) -> list[Advance]:
    """Write many sightings (rows from `sighting`, one per agent): one advance statement per
    `ADVANCE_CHUNK` rows and one executemany. Returns the advances this transaction recorded; count
    them only once it commits (a flush that fails is written again, and would count them again)."""
    if not rows:
        return []
    # In id order, in every process: PostgreSQL locks the rows in the order it updates them, and the
    # api's and the bridge's flushes of the same agents then never wait for each other in a cycle.
    rows = sorted(rows, key=lambda row: str(row["id"]))
    advances = _advance(connection, rows)
    connection.execute(AGENT_SEEN, rows)
    return advances


def _advance(connection: Connection, rows: list[dict[str, Any]]) -> list[Advance]:
    candidates = [row for row in rows if row["serial"] is not None and row["serial"] > 0]
    advanced: list[Advance] = []
    for start in range(0, len(candidates), ADVANCE_CHUNK):
        chunk = candidates[start : start + ADVANCE_CHUNK]
        returned = _advance_statement(connection, chunk)
        by_id = {row["id"]: row for row in chunk}
        for agent_id in returned:
            row = by_id[agent_id]
            advanced.append(Advance(agent_id, int(row["serial"]), row["seen"]))
    return advanced


def _advance_statement(connection: Connection, chunk: list[dict[str, Any]]) -> list[str]:
    """Run the advance statement over `chunk`; the ids of the agents it advanced."""
    dialect = connection.dialect
    template = _ROW.get(dialect.name)
    if template is None:
        raise NotImplementedError(f"Policycast runs on SQLite or PostgreSQL, not {dialect.name}")
    to_db: Callable[[Any], Any] | None = DateTime(timezone=True).dialect_impl(dialect).bind_processor(dialect)
    parameters: list[Any] = []
    for row in chunk:
        seen = row["seen"] if to_db is None else to_db(row["seen"])
        parameters.extend((row["id"], row["serial"], row["location_id"], seen))
    sql = _ADVANCE.format(rows=", ".join([template] * len(chunk)))
    return [str(found[0]) for found in connection.exec_driver_sql(sql, tuple(parameters)).all()]
