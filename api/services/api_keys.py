"""Admin API keys: created by `policycast admin create-key`, stored hashed, checked per request."""

from __future__ import annotations

from sqlmodel import Session, col, select

from api.errors import Unauthorized
from api.security import Principal, Role, hash_secret, new_secret, same_secret
from manager_db.models import ApiKey


def create_api_key(session: Session, *, name: str, role: Role) -> str:
    """Store a new key and return it in clear: the only time anyone sees it."""
    key = new_secret("pck")
    session.add(ApiKey(name=name, role=role, key_hash=hash_secret(key)))
    session.commit()
    return key


def authenticate(session: Session, *, key: str | None, bootstrap_key: str | None) -> Principal:
    if key is None:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    if bootstrap_key and same_secret(key, bootstrap_key):
        return Principal(name="bootstrap", role="admin")
    row = session.exec(select(ApiKey).where(col(ApiKey.key_hash) == hash_secret(key))).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("unknown or revoked API key")
    role: Role = "admin" if row.role == "admin" else "viewer"
    return Principal(name=f"key:{row.id}:{row.name}", role=role)
