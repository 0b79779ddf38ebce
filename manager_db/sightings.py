"""The one statement that records an agent as seen, for heartbeat bookkeeping and the bridge's ingest.

Two observers write the same columns of `agents`: the api's heartbeat ledger (every heartbeat) and the
bridge's state ingest (every state message on the broker). Each passes what it observed; a field it
did not observe is None and keeps the stored value. Revoked agents are not updated.

The newer observation wins, column by column:

- `last_seen`, `serial`, `location_id` and `mode` take a sighting only if it is not older than the
  stored `last_seen`, whichever process wrote that;
- `status` (reported by heartbeats only, and only when it changed) takes a sighting's status only if
  it is not older than the stored status (`status_at`): a heartbeat flushed after a newer state
  message still records its status, which the agent will not send again;
- a served "update now" clears `update_requested` whatever the order.
"""

from __future__ import annotations

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


def record_sightings(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Write many sightings in one executemany (rows from `sighting`)."""
    if rows:
        connection.execute(AGENT_SEEN, rows)
