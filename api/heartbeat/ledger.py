"""`HeartbeatLedger`: what each heartbeat reports, kept in memory and written in one batch.

Last seen, serial held, location, mode and status are recorded per agent and written every
`heartbeat_flush_s` with the one "agent seen" statement (`manager_db.sightings`), so no heartbeat
writes to the database (except for log uploads, which are the point of those requests). Agents send
`status` only when it changed: a heartbeat without one keeps the status recorded before it, in memory
and in the database. The agents a flush found on a new serial go to `on_advances` once it committed
(the convergence SLO, `manager_db.metrics.ConvergenceObserver`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from manager_db.models import utcnow
from manager_db.sightings import Advance, record_sightings, sighting

log = logging.getLogger(__name__)
_DATA_ERRORS = (DBAPIError, OverflowError, ValueError, TypeError)
"""What a row the database cannot hold raises (SQLite's driver raises OverflowError itself)."""


@dataclass(slots=True)
class Sighting:
    last_seen: datetime
    serial: int
    location_id: int
    mode: str
    status: dict[str, Any] | None
    """None: the agent did not send one (unchanged); the stored status stays."""
    served_update: bool

    def after(self, older: Sighting) -> Sighting:
        """This sighting, keeping what it does not override of an older one not written yet."""
        return replace(
            self,
            status=self.status if self.status is not None else older.status,
            served_update=self.served_update or older.served_update,
        )

    def row(self, agent_id: str) -> dict[str, Any]:
        return sighting(
            agent_id,
            seen=self.last_seen,
            serial=self.serial,
            location_id=self.location_id,
            mode=self.mode,
            status=self.status,
            served_update=self.served_update,
        )


class HeartbeatLedger:
    """Heartbeat bookkeeping, held in memory and written in batches."""

    def __init__(self, on_advances: Callable[[list[Advance]], None] | None = None) -> None:
        self.on_advances = on_advances
        """Hears the advances of each committed flush (`manager_db.sightings.record_sightings`)."""
        self._pending: dict[str, Sighting] = {}
        self._unwritten: dict[str, Sighting] = {}
        """Sightings of a flush that failed, merged into the next one. Touched only by `flush` (under
        the lock), never by `record`, which runs on the event loop while a flush runs in a thread."""
        self._lock = threading.Lock()  # one flush at a time
        self._swap = threading.Lock()
        """Held for a dict lookup and store in `record`, and for the swap in `flush`: without it a
        sighting recorded as the flush (another thread) takes the dict could land in the taken dict,
        mid-iteration, and be lost. Never held across the database write, which would stall the loop."""

    def __len__(self) -> int:
        return len(self._pending.keys() | self._unwritten.keys())

    def record(
        self,
        agent_id: str,
        *,
        serial: int,
        location_id: int,
        mode: str,
        status: dict[str, Any] | None,
        served_update: bool,
    ) -> None:
        """Note one heartbeat; `status` None (not sent) keeps the last status recorded or stored."""
        seen = Sighting(utcnow(), serial, location_id, mode, status, served_update)
        with self._swap:
            previous = self._pending.get(agent_id)
            self._pending[agent_id] = seen if previous is None else seen.after(previous)

    def flush(self, engine: Engine) -> int:
        """Write what was recorded since the last flush; return how many agents it touched."""
        with self._lock:
            with self._swap:
                pending, self._pending = self._pending, {}
            for agent_id, older in self._unwritten.items():
                newer = pending.get(agent_id)
                pending[agent_id] = older if newer is None else newer.after(older)
            self._unwritten = {}
            if not pending:
                return 0
            rows = [seen.row(agent_id) for agent_id, seen in pending.items()]
            try:
                with engine.begin() as connection:
                    advances = record_sightings(connection, rows)
            except OperationalError:
                # The database is away: keep every sighting for the next flush, where newer ones win
                # but keep what they do not override (a status sent only before the outage).
                log.warning(
                    "heartbeat bookkeeping flush failed; keeping %d sightings for the next one", len(rows)
                )
                self._unwritten = pending
                raise
            except _DATA_ERRORS:
                # One bad row must not stall everyone's bookkeeping: write them one by one, drop the bad.
                return self._write_one_by_one(engine, rows)
            self._advanced(advances)
            return len(rows)

    def _write_one_by_one(self, engine: Engine, rows: list[dict[str, Any]]) -> int:
        written = 0
        advances: list[Advance] = []
        for row in rows:
            try:
                with engine.begin() as connection:
                    advances += record_sightings(connection, [row])
                written += 1
            except _DATA_ERRORS as exc:
                log.error("dropped the heartbeat bookkeeping of agent %s: %s", row["id"], exc)
        self._advanced(advances)
        return written

    def _advanced(self, advances: list[Advance]) -> None:
        if advances and self.on_advances is not None:
            try:
                self.on_advances(advances)
            except Exception:  # the bookkeeping is written; a listener's failure must not undo the flush
                log.exception("a listener of %d advance(s) failed", len(advances))
