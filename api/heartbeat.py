"""The heartbeat hot path: an in-memory view of documents and agents, and batched bookkeeping.

`FabricView` answers "who is this secret?" and "what is the current document of (group, location)?"
from memory. It polls the `fabric_counters` row every `cache_refresh_s`: every committed change bumps
`generation`, so a process sees changes made by any other process within one poll, and its own at once
(the change calls `refresh` after committing).

`HeartbeatLedger` keeps what each heartbeat reports (last seen, serial held, location, mode, status) in
memory and writes it in one batch every `heartbeat_flush_s`, so no heartbeat writes to the database
(except for log uploads, which are the point of those requests). Agents send `status` only when it
changed: a heartbeat without one keeps the status recorded before it, in memory and in the database.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Engine, bindparam, text
from sqlalchemy.exc import DBAPIError, OperationalError

from manager_db.models import utcnow

log = logging.getLogger(__name__)
_DATA_ERRORS = (DBAPIError, OverflowError, ValueError, TypeError)
"""What a row the database cannot hold raises (SQLite's driver raises OverflowError itself)."""


@dataclass(frozen=True, slots=True)
class CachedDocument:
    serial: int
    heartbeat_s: int
    envelope: bytes


@dataclass(frozen=True, slots=True)
class KnownAgent:
    id: str
    group_id: int
    revoked: bool
    update_requested: bool


class FabricView:
    """What the heartbeat needs, in memory, kept current by polling one counter row."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._generation = -1
        self.documents: dict[tuple[int, int], CachedDocument] = {}
        self.defaults: dict[int, int] = {}
        self._agents: dict[str, KnownAgent] = {}  # by secret hash
        self._hash_of: dict[str, str] = {}  # agent id -> secret hash

    @property
    def generation(self) -> int:
        return self._generation

    def refresh(self) -> bool:
        """Reload what changed since the last refresh; True if anything did. Runs in a worker thread."""
        with self._lock, self._engine.connect() as connection:
            generation = connection.execute(
                text("SELECT generation FROM fabric_counters WHERE id = 1")
            ).scalar_one()
            if generation == self._generation:
                return False
            self._reload_documents(connection)
            self._reload_agents(connection, since=self._generation)
            self._generation = int(generation)
            return True

    def _reload_documents(self, connection: Any) -> None:
        rows = connection.execute(
            text("SELECT group_id, location_id, serial, heartbeat_s, is_default FROM effective_configs")
        ).all()
        old = self.documents
        stale = [(g, loc, s) for g, loc, s, _, _ in rows if (g, loc) not in old or old[(g, loc)].serial != s]
        envelopes: dict[int, bytes] = {}
        if stale:
            query = text(
                "SELECT serial, envelope FROM effective_configs WHERE serial IN :serials"
            ).bindparams(bindparam("serials", expanding=True))
            for chunk_start in range(0, len(stale), 500):
                chunk = [s for _, _, s in stale[chunk_start : chunk_start + 500]]
                envelopes.update(
                    (int(s), bytes(e)) for s, e in connection.execute(query, {"serials": chunk}).all()
                )
        documents: dict[tuple[int, int], CachedDocument] = {}
        defaults: dict[int, int] = {}
        for group_id, location_id, serial, heartbeat_s, is_default in rows:
            key = (group_id, location_id)
            envelope = envelopes.get(serial)
            if envelope is None:
                cached = old.get(key)
                if cached is None or cached.serial != serial:
                    continue  # replaced between the two reads; the next refresh picks it up
                documents[key] = cached
            else:
                documents[key] = CachedDocument(int(serial), int(heartbeat_s), envelope)
            if is_default:
                defaults[group_id] = location_id
        self.documents, self.defaults = documents, defaults

    def _reload_agents(self, connection: Any, *, since: int) -> None:
        if since < 0:
            self._agents, self._hash_of = {}, {}
            return  # first load: agents are read lazily, on their first heartbeat
        rows = connection.execute(
            text(
                "SELECT id, secret_hash, group_id, revoked_at, update_requested FROM agents "
                "WHERE generation > :g"
            ),
            {"g": since},
        ).all()
        agents, hash_of = dict(self._agents), dict(self._hash_of)
        for agent_id, secret_hash, group_id, revoked_at, update_requested in rows:
            if agent_id in hash_of or secret_hash in agents:
                agents[secret_hash] = KnownAgent(
                    agent_id, group_id, revoked_at is not None, bool(update_requested)
                )
                hash_of[agent_id] = secret_hash
        self._agents, self._hash_of = agents, hash_of

    def cached_agent(self, secret_hash: str) -> KnownAgent | None:
        return self._agents.get(secret_hash)

    def load_agent(self, secret_hash: str) -> KnownAgent | None:
        """Read one agent from the database (a cache miss); None if no agent has this secret."""
        with self._engine.connect() as connection:
            row = connection.execute(
                text("SELECT id, group_id, revoked_at, update_requested FROM agents WHERE secret_hash = :h"),
                {"h": secret_hash},
            ).first()
        if row is None:
            return None
        agent = KnownAgent(row[0], row[1], row[2] is not None, bool(row[3]))
        self._agents[secret_hash] = agent
        self._hash_of[agent.id] = secret_hash
        return agent

    def served_update(self, secret_hash: str) -> None:
        agent = self._agents.get(secret_hash)
        if agent is not None:
            self._agents[secret_hash] = replace(agent, update_requested=False)

    def document_for(self, group_id: int, location_id: int | None) -> tuple[int, CachedDocument] | None:
        """The document of (group, location), or of the group's Default when the location is not its."""
        if location_id is not None:
            document = self.documents.get((group_id, location_id))
            if document is not None:
                return location_id, document
        default = self.defaults.get(group_id)
        if default is None:
            return None
        return default, self.documents[(group_id, default)]


def next_heartbeat_s(heartbeat_s: int, jitter: float) -> int:
    """The interval with +/- `jitter` spread, so that a fleet does not heartbeat in step."""
    if jitter <= 0:
        return heartbeat_s
    return max(1, round(heartbeat_s * random.uniform(1 - jitter, 1 + jitter)))


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


class HeartbeatLedger:
    """Heartbeat bookkeeping, held in memory and written in batches."""

    def __init__(self) -> None:
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
        sighting = Sighting(utcnow(), serial, location_id, mode, status, served_update)
        with self._swap:
            previous = self._pending.get(agent_id)
            self._pending[agent_id] = sighting if previous is None else sighting.after(previous)

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
            rows = [
                {
                    "id": agent_id,
                    "last_seen": s.last_seen,
                    "serial": s.serial,
                    "location_id": s.location_id,
                    "mode": s.mode,
                    "status": s.status,
                    "clear": s.served_update,
                }
                for agent_id, s in pending.items()
            ]
            statement = text(
                "UPDATE agents SET last_seen = :last_seen, serial = :serial, location_id = :location_id, "
                "mode = :mode, status = COALESCE(:status, status), "
                "update_requested = CASE WHEN :clear THEN false ELSE update_requested END "
                # The bridge writes these columns too (from MQTT state): the newer observation wins.
                "WHERE id = :id AND (last_seen IS NULL OR last_seen <= :last_seen)"
            ).bindparams(
                # none_as_null: a status not sent is SQL NULL (COALESCE keeps the stored one), not 'null'
                bindparam("status", type_=JSON(none_as_null=True)),
                bindparam("last_seen", type_=DateTime(timezone=True)),
            )
            try:
                with engine.begin() as connection:
                    connection.execute(statement, rows)
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
                return self._write_one_by_one(engine, statement, rows)
            return len(rows)

    @staticmethod
    def _write_one_by_one(engine: Engine, statement: Any, rows: list[dict[str, Any]]) -> int:
        written = 0
        for row in rows:
            try:
                with engine.begin() as connection:
                    connection.execute(statement, row)
                written += 1
            except _DATA_ERRORS as exc:
                log.error("dropped the heartbeat bookkeeping of agent %s: %s", row["id"], exc)
        return written
