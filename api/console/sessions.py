"""Console sessions: an API key, given once at sign-in, opens a session held in SQL.

The browser keeps a random session id in a cookie (HttpOnly, SameSite=Strict, Secure); SQL keeps its
hash, the hash of the API key that opened it and the session's CSRF token. Every request checks the key
again (`ApiKeyCache.authenticate_hash`), so revoking the key or retiring the bootstrap key ends its
sessions on every replica within the cache's refresh; signing out ends the session in SQL, so a copied
cookie is worthless afterwards. The key itself is never stored or logged.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine
from sqlmodel import Session, col, delete, select

from api.errors import Unauthorized
from api.key_cache import ApiKeyCache
from api.security import Principal, hash_secret, same_secret
from manager_db.models import ConsoleSession, as_utc, utcnow

COOKIE = "policycast_session"
SIGNIN_COOKIE = "policycast_signin"
"""A double-submit token for the sign-in form, which has no session to carry a CSRF token yet."""
EXPIRED = "your console session has ended: sign in again"


@dataclass(frozen=True)
class Operator:
    """Who is using the console, and the CSRF token every form of theirs carries."""

    principal: Principal
    csrf_token: str
    session_hash: str

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def can_change(self) -> bool:
        return self.principal.can_change


def open_session(engine: Engine, keys: ApiKeyCache, *, api_key: str, ttl_s: int) -> tuple[str, Operator]:
    """Check the key and open a session: (the cookie's value, the operator). `Unauthorized` for a key
    the admin API would refuse."""
    principal = keys.authenticate(api_key.strip() or None, load=True)
    assert principal is not None
    session_id = secrets.token_urlsafe(32)
    row = ConsoleSession(
        id_hash=hash_secret(session_id),
        key_hash=hash_secret(api_key.strip()),
        csrf_token=secrets.token_urlsafe(32),
        expires_at=utcnow() + timedelta(seconds=ttl_s),
    )
    with Session(engine, expire_on_commit=False) as session:
        # Sessions that ended or expired a day ago are of no use to anyone: sweep them as we go.
        session.exec(
            delete(ConsoleSession).where(col(ConsoleSession.expires_at) < utcnow() - timedelta(days=1))
        )
        session.add(row)
        session.commit()
    return session_id, Operator(principal, row.csrf_token, row.id_hash)


def operator_of(engine: Engine, keys: ApiKeyCache, session_id: str | None) -> Operator:
    """The operator whose cookie this is; `Unauthorized` for none, an unknown, ended or expired session,
    or one whose key no longer admits it."""
    if not session_id:
        raise Unauthorized("sign in to use the console")
    with Session(engine) as session:
        row = session.exec(
            select(ConsoleSession).where(col(ConsoleSession.id_hash) == hash_secret(session_id))
        ).first()
    if row is None or row.ended_at is not None or (as_utc(row.expires_at) or utcnow()) <= utcnow():
        raise Unauthorized(EXPIRED)
    principal = keys.authenticate_hash(row.key_hash, load=True)
    assert principal is not None
    return Operator(principal, row.csrf_token, row.id_hash)


def end_session(engine: Engine, operator: Operator) -> None:
    with Session(engine) as session:
        row = session.get(ConsoleSession, operator.session_hash)
        if row is not None and row.ended_at is None:
            row.ended_at = utcnow()
            session.add(row)
            session.commit()


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(given) and same_secret(expected, given or "")
