"""`ApiKeyCache`: who an admin API key is, answered from memory, and when each key was last used.

Every API key is small and few, so the cache holds all of them: `reload` reads the whole `api_keys`
table and the bootstrap key's retirement whenever the fabric's change `generation` moved (it is a
follower of `FabricView.refresh`, so it runs in the same poll, every `cache_refresh_s`, and at once
after a change committed by this process). Creating, revoking and retiring are changes: they bump
the generation, so every replica refuses a revoked key within one poll.

A key the cache does not hold (created through another process since the last poll) is read with one
indexed SELECT (`load`). As in `FabricView.load_agent`, a read that raced a reload is not stored: the
reload may have seen a revocation that the read predates.

"Last used" never costs the request a database write: `authenticate` notes the time in memory and
`flush` writes the newest time of every key used since the last flush in one `executemany`, every
`heartbeat_flush_s` (the heartbeat ledger's rhythm). It is not a change: it bumps no generation.

Threads: `reload`, `load` and `flush` run in worker threads; `authenticate` (without `load`) runs on
the event loop. `_lock` guards the maps and is never held across I/O.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, DateTime, Engine, bindparam, select, text

from api.errors import Unauthorized
from api.security import Principal, Role, hash_secret, same_secret
from manager_db.models import ApiKey, BootstrapKeyRetirement, as_utc, utcnow

MISSING = "missing API key: send Authorization: Bearer <key>"
UNKNOWN = "unknown or revoked API key"
EXPIRED = "expired API key: ask an admin for a new one"
RETIRED = (
    "the bootstrap admin key has been retired: use an API key (and unset POLICYCAST_BOOTSTRAP_ADMIN_KEY)"
)
BOOTSTRAP = Principal(name="bootstrap", role="admin")
_LOAD_ATTEMPTS = 3

_KEYS = ApiKey.__table__.c  # type: ignore[attr-defined]
_RETIREMENT = BootstrapKeyRetirement.__table__.c  # type: ignore[attr-defined]
_READ_KEYS = select(_KEYS.id, _KEYS.key_hash, _KEYS.name, _KEYS.role, _KEYS.expires_at, _KEYS.revoked_at)
LAST_USED = text(
    "UPDATE api_keys SET last_used_at = :at WHERE id = :id AND (last_used_at IS NULL OR last_used_at < :at)"
).bindparams(bindparam("at", type_=DateTime(timezone=True)))


@dataclass(frozen=True, slots=True)
class KnownKey:
    id: int
    name: str
    role: Role
    expires_at: datetime | None
    revoked: bool

    @property
    def principal(self) -> Principal:
        return Principal(name=f"key:{self.id}:{self.name}", role=self.role)


def _known(row: tuple[object, ...]) -> tuple[str, KnownKey]:
    key_id, key_hash, name, role, expires_at, revoked_at = row
    assert isinstance(key_id, int) and isinstance(key_hash, str)
    return key_hash, KnownKey(
        id=key_id,
        name=str(name),
        role="admin" if role == "admin" else "viewer",
        expires_at=as_utc(expires_at) if isinstance(expires_at, datetime) else None,
        revoked=revoked_at is not None,
    )


class ApiKeyCache:
    """Every API key, in memory, by hash; the bootstrap key and whether it is retired."""

    def __init__(self, engine: Engine, bootstrap_key: str | None) -> None:
        self._engine = engine
        self._bootstrap_key = bootstrap_key or None
        self._lock = threading.Lock()
        self._keys: dict[str, KnownKey] = {}
        self._bootstrap_retired = False
        self._epoch = 0
        """Bumped (under `_lock`) by every reload."""
        self._used: dict[int, datetime] = {}

    @property
    def bootstrap_configured(self) -> bool:
        """This process's environment sets `POLICYCAST_BOOTSTRAP_ADMIN_KEY`."""
        return self._bootstrap_key is not None

    # --- loading -------------------------------------------------------------------------------------

    def reload(self, connection: Connection) -> None:
        """Read every key and the bootstrap key's retirement (a follower of `FabricView.refresh`)."""
        keys = dict(_known(tuple(row)) for row in connection.execute(_READ_KEYS))
        retired = connection.execute(select(_RETIREMENT.id)).first() is not None
        with self._lock:
            self._keys = keys
            self._bootstrap_retired = retired
            self._epoch += 1

    def load(self, key_hash: str) -> KnownKey | None:
        """Read one key from the database (a cache miss); None if no key has this hash."""
        known: KnownKey | None = None
        for _ in range(_LOAD_ATTEMPTS):
            epoch = self._epoch
            with self._engine.connect() as connection:
                row = connection.execute(_READ_KEYS.where(_KEYS.key_hash == key_hash)).first()
            if row is None:
                return None
            _, known = _known(tuple(row))
            with self._lock:
                if self._epoch == epoch:  # no reload ran while we read: the row is current
                    self._keys[key_hash] = known
                    return known
        return known  # reloads kept racing the read: answer from the newest read, cache nothing

    # --- checking ------------------------------------------------------------------------------------

    def authenticate(self, key: str | None, *, load: bool) -> Principal | None:
        """The caller of the admin API, or None when the key is not in memory and `load` is false (ask
        again with `load=True`, from a worker thread). Raises `Unauthorized` for a missing, unknown,
        revoked or expired key and for the bootstrap key once retired."""
        if key is None:
            raise Unauthorized(MISSING)
        return self.authenticate_hash(hash_secret(key), load=load)

    def authenticate_hash(self, key_hash: str, *, load: bool) -> Principal | None:
        """`authenticate` for a key known by its hash: a console session holds the hash of the key it
        was opened with, never the key, and is checked against it on every request."""
        if self._bootstrap_key is not None and same_secret(key_hash, hash_secret(self._bootstrap_key)):
            if self._bootstrap_retired:
                raise Unauthorized(RETIRED)
            return BOOTSTRAP
        known = self._keys.get(key_hash)
        if known is None:
            if not load:
                return None
            known = self.load(key_hash)
        if known is None or known.revoked:
            raise Unauthorized(UNKNOWN)
        now = utcnow()
        if known.expires_at is not None and now >= known.expires_at:
            raise Unauthorized(EXPIRED)
        with self._lock:
            self._used[known.id] = now
        return known.principal

    # --- last used -----------------------------------------------------------------------------------

    def pending_use(self, key_id: int) -> datetime | None:
        """When this process last admitted the key, if not written yet."""
        return self._used.get(key_id)

    def flush(self, engine: Engine) -> int:
        """Write when each key used since the last flush was last used; how many keys. On failure the
        times are kept for the next flush (newer ones win)."""
        with self._lock:
            pending, self._used = self._used, {}
        if not pending:
            return 0
        try:
            with engine.begin() as connection:
                connection.execute(LAST_USED, [{"id": i, "at": at} for i, at in pending.items()])
        except Exception:
            with self._lock:
                for key_id, at in pending.items():
                    if key_id not in self._used or self._used[key_id] < at:
                        self._used[key_id] = at
            raise
        return len(pending)
