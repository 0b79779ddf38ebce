"""`FabricView`: the documents and the agents that the heartbeat needs, in memory.

It answers "who is this secret?" and "what is the current document of (group, location)?" without the
database. It polls the `fabric_counters` row every `cache_refresh_s`: every committed change bumps
`generation`, so a process sees changes made by any other process within one poll, and its own at once
(the change calls `refresh` after committing).

Agents are read lazily, on their first heartbeat (`load_agent`), and from then on kept current by
`refresh`, which re-reads the agents whose row a change stamped with a newer generation. Caches of other
things that changes alter (the API keys) follow the same poll: `followers` reload when it moved.

Threads: `refresh` and `load_agent` run in worker threads (they read the database), the lookups and
`served_update` on the event loop. `_refresh_lock` lets one refresh run at a time and is held across
its reads; `_cache_lock` guards every change to the agent cache and is never held across I/O, so the
event loop never waits for the database. A cache miss that read an agent row while a refresh ran does
not store what it read (`_agent_epoch` tells): that refresh may have passed over the agent, unknown to
it then, and the row may predate a revocation the refresh saw.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from sqlalchemy import Connection, Engine, bindparam, text

_ENVELOPE_CHUNK = 500
_LOAD_ATTEMPTS = 3


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


@dataclass(frozen=True, slots=True)
class DocumentSet:
    """Every current document and each group's Default location, swapped in as one value so that a
    lookup never pairs a new Default with the old documents."""

    documents: dict[tuple[int, int], CachedDocument] = field(default_factory=dict)
    defaults: dict[int, int] = field(default_factory=dict)


class FabricView:
    """What the heartbeat needs, in memory, kept current by polling one counter row."""

    def __init__(self, engine: Engine, *, followers: Sequence[Callable[[Connection], None]] = ()) -> None:
        self._engine = engine
        self._followers = tuple(followers)
        """Other caches that reload when the generation moved, in the same poll and connection (the
        API keys: `api.key_cache.ApiKeyCache.reload`)."""
        self._refresh_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._generation = -1
        self._agent_epoch = 0
        """Bumped (under `_cache_lock`) by every refresh that re-read agents."""
        self._documents = DocumentSet()
        self._agents: dict[str, KnownAgent] = {}  # by secret hash
        self._hash_of: dict[str, str] = {}  # agent id -> secret hash

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def documents(self) -> dict[tuple[int, int], CachedDocument]:
        return self._documents.documents

    # --- refreshing ----------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Reload what changed since the last refresh; True if anything did. Runs in a worker thread."""
        with self._refresh_lock, self._engine.connect() as connection:
            generation = connection.execute(
                text("SELECT generation FROM fabric_counters WHERE id = 1")
            ).scalar_one()
            if generation == self._generation:
                return False
            self._documents = self._reload_documents(connection, self._documents)
            self._reload_agents(connection, since=self._generation)
            for follow in self._followers:
                follow(connection)
            self._generation = int(generation)
            return True

    @staticmethod
    def _reload_documents(connection: Connection, old: DocumentSet) -> DocumentSet:
        rows = connection.execute(
            text("SELECT group_id, location_id, serial, heartbeat_s, is_default FROM effective_configs")
        ).all()
        held = old.documents
        stale = [s for g, loc, s, _, _ in rows if (g, loc) not in held or held[(g, loc)].serial != s]
        envelopes: dict[int, bytes] = {}
        if stale:
            query = text(
                "SELECT serial, envelope FROM effective_configs WHERE serial IN :serials"
            ).bindparams(bindparam("serials", expanding=True))
            for start in range(0, len(stale), _ENVELOPE_CHUNK):
                chunk = stale[start : start + _ENVELOPE_CHUNK]
                envelopes.update(
                    (int(s), bytes(e)) for s, e in connection.execute(query, {"serials": chunk}).all()
                )
        fresh = DocumentSet()
        for group_id, location_id, serial, heartbeat_s, is_default in rows:
            key = (group_id, location_id)
            envelope = envelopes.get(serial)
            if envelope is None:
                cached = held.get(key)
                if cached is None or cached.serial != serial:
                    continue  # replaced between the two reads; the next refresh picks it up
                fresh.documents[key] = cached
            else:
                fresh.documents[key] = CachedDocument(int(serial), int(heartbeat_s), envelope)
            if is_default:
                fresh.defaults[group_id] = location_id
        return fresh

    def _reload_agents(self, connection: Connection, *, since: int) -> None:
        if since < 0:  # first load: agents are read lazily, on their first heartbeat
            with self._cache_lock:
                self._agents, self._hash_of = {}, {}
                self._agent_epoch += 1
            return
        rows = connection.execute(
            text(
                "SELECT id, secret_hash, group_id, revoked_at, update_requested FROM agents "
                "WHERE generation > :g"
            ),
            {"g": since},
        ).all()
        with self._cache_lock:
            for agent_id, secret_hash, group_id, revoked_at, update_requested in rows:
                if agent_id in self._hash_of or secret_hash in self._agents:
                    self._agents[secret_hash] = KnownAgent(
                        agent_id, group_id, revoked_at is not None, bool(update_requested)
                    )
                    self._hash_of[agent_id] = secret_hash
            self._agent_epoch += 1

    # --- agents --------------------------------------------------------------------------------------

    def cached_agent(self, secret_hash: str) -> KnownAgent | None:
        return self._agents.get(secret_hash)

    def load_agent(self, secret_hash: str) -> KnownAgent | None:
        """Read one agent from the database (a cache miss); None if no agent has this secret."""
        agent: KnownAgent | None = None
        for _ in range(_LOAD_ATTEMPTS):
            epoch = self._agent_epoch
            with self._engine.connect() as connection:
                agent = self._read_agent(connection, secret_hash)
            if agent is None:
                return None
            with self._cache_lock:
                if self._agent_epoch == epoch:  # no refresh ran while we read: the row is current
                    self._agents[secret_hash] = agent
                    self._hash_of[agent.id] = secret_hash
                    return agent
        return agent  # refreshes kept racing the read: answer from the newest read, cache nothing

    def _read_agent(self, connection: Connection, secret_hash: str) -> KnownAgent | None:
        row = connection.execute(
            text("SELECT id, group_id, revoked_at, update_requested FROM agents WHERE secret_hash = :h"),
            {"h": secret_hash},
        ).first()
        return None if row is None else KnownAgent(row[0], row[1], row[2] is not None, bool(row[3]))

    def served_update(self, secret_hash: str) -> None:
        """The agent has been answered "changed" for its pending update-now."""
        with self._cache_lock:  # on the newest entry: a refresh may have just revoked or moved it
            agent = self._agents.get(secret_hash)
            if agent is not None:
                self._agents[secret_hash] = replace(agent, update_requested=False)

    # --- documents -----------------------------------------------------------------------------------

    def document_for(self, group_id: int, location_id: int | None) -> tuple[int, CachedDocument] | None:
        """The document of (group, location), or of the group's Default when the location is not its."""
        current = self._documents
        if location_id is not None:
            document = current.documents.get((group_id, location_id))
            if document is not None:
                return location_id, document
        default = current.defaults.get(group_id)
        if default is None:
            return None
        return default, current.documents[(group_id, default)]
