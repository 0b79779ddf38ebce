"""Admin API keys: create (shown once, stored hashed), list, revoke; retire the bootstrap key.

Each of these is a `Change`: it bumps the fabric's generation, so every replica's key cache
(`api.key_cache.ApiKeyCache`) reloads within `cache_refresh_s`, and writes an audit row. Who is
calling is answered by the cache, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, or_, select

from api.errors import Conflict, NotFound
from api.security import Role, hash_secret, new_secret
from api.services.change import Change
from manager_db.models import ApiKey, BootstrapKeyRetirement, as_utc, utcnow

BOOTSTRAP_TARGET = "api_key:bootstrap"


def create_key(
    change: Change, *, role: Role, name: str, expires_in_s: int | None = None
) -> tuple[str, ApiKey]:
    """A new key, in clear (the only time anyone sees it), and its row."""
    key = new_secret("pck")
    expires_at = None if expires_in_s is None else utcnow() + timedelta(seconds=expires_in_s)
    row = ApiKey(name=name, role=role, key_hash=hash_secret(key), expires_at=expires_at)
    change.session.add(row)
    change.session.flush()
    change.audit(
        "api_key.create",
        f"api_key:{row.id}",
        role=role,
        name=name,
        expires_at=None if expires_at is None else expires_at.isoformat(),
    )
    return key, row


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.exec(select(ApiKey).order_by(col(ApiKey.id))).all())


def last_used(row: ApiKey, pending: datetime | None) -> datetime | None:
    """When the key last authenticated a request: its row's time, or a later one this process has not
    written yet (`ApiKeyCache.pending_use`: the row is written in batches)."""
    written = as_utc(row.last_used_at)
    return pending if pending is not None and (written is None or pending > written) else written


def is_active(row: ApiKey, now: datetime) -> bool:
    """Neither revoked nor expired."""
    expires_at = as_utc(row.expires_at)
    return row.revoked_at is None and (expires_at is None or expires_at > now)


@dataclass(frozen=True)
class KeyView:
    """An API key as operators see it (the admin API's `ApiKeyOut`, the console's list): never a secret."""

    id: int
    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    active: bool

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "Revoked"
        return "Active" if self.active else "Expired"


def key_view(row: ApiKey, *, pending_use: datetime | None, now: datetime) -> KeyView:
    """`row` as operators see it; `pending_use` is this process's unwritten use (`last_used`)."""
    assert row.id is not None
    return KeyView(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=as_utc(row.created_at),
        last_used_at=last_used(row, pending_use),
        expires_at=as_utc(row.expires_at),
        revoked_at=as_utc(row.revoked_at),
        active=is_active(row, now),
    )


def revoke_key(change: Change, *, key_id: int) -> ApiKey:
    row = change.session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id}")
    if row.revoked_at is not None:
        raise Conflict(f"API key {key_id} is already revoked")
    row.revoked_at = utcnow()
    change.session.add(row)
    change.audit("api_key.revoke", f"api_key:{key_id}", name=row.name, role=row.role)
    return row


def bootstrap_retirement(session: Session) -> BootstrapKeyRetirement | None:
    return session.get(BootstrapKeyRetirement, 1)


def retire_bootstrap(change: Change) -> BootstrapKeyRetirement:
    """Refuse `POLICYCAST_BOOTSTRAP_ADMIN_KEY` on every replica from now on, whatever its environment
    says. Refused while no admin key could take its place (an operator would be locked out of the API)."""
    session = change.session
    retired = bootstrap_retirement(session)
    if retired is not None:
        raise Conflict(f"the bootstrap admin key was already retired at {retired.retired_at.isoformat()}")
    now = utcnow()
    usable_admin_key = session.exec(
        select(ApiKey.id).where(
            col(ApiKey.role) == "admin",
            col(ApiKey.revoked_at).is_(None),
            or_(col(ApiKey.expires_at).is_(None), col(ApiKey.expires_at) > now),
        )
    ).first()
    if usable_admin_key is None:
        raise Conflict(
            "no usable admin API key: create one first (POST /api/v1/api-keys with role admin, or "
            "policycast admin keys create --role admin), then retire the bootstrap key"
        )
    row = BootstrapKeyRetirement(id=1, retired_at=now, retired_by=change.actor[:128])
    session.add(row)
    change.audit("bootstrap_key.retire", BOOTSTRAP_TARGET)
    return row


def create_api_key(session: Session, *, name: str, role: Role, expires_in_s: int | None = None) -> str:
    """Create a key in a change of its own, committed; return it in clear."""
    change = Change(session=session, actor="cli", signing_key=None)
    key, _ = create_key(change, role=role, name=name, expires_in_s=expires_in_s)
    change.commit()
    return key
