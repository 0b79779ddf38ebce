"""The one statement that records an agent as seen, for heartbeat bookkeeping and the bridge's ingest.

Two observers write the same columns of `agents`: the api's heartbeat ledger (every heartbeat) and the
bridge's state ingest (every state message on the broker). Each passes what it observed; a field it
did not observe is None and keeps the stored value. The newer observation wins: a sighting older than
the stored `last_seen` changes nothing, whichever process wrote that. Revoked agents are not updated.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Connection, DateTime, bindparam, text

AGENT_SEEN = text(
    "UPDATE agents SET last_seen = :seen, serial = COALESCE(:serial, serial), "
    "location_id = COALESCE(:location_id, location_id), mode = COALESCE(:mode, mode), "
    "status = COALESCE(:status, status), "
    "update_requested = CASE WHEN :served_update THEN false ELSE update_requested END "
    "WHERE id = :id AND revoked_at IS NULL AND (last_seen IS NULL OR last_seen <= :seen)"
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
