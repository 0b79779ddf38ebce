"""`ApiKeyCache` on its own, against a real database: misses, the race of a miss with a reload, flushes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, update
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from api.errors import Unauthorized
from api.key_cache import ApiKeyCache
from api.security import hash_secret
from api.services.api_keys import create_api_key
from manager_db.database import make_engine
from manager_db.models import ApiKey, utcnow


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    made = make_engine(database_url)
    yield made
    made.dispose()


def test_a_miss_that_raced_a_revocation_does_not_cache_the_stale_row(engine: Engine) -> None:
    with Session(engine) as session:
        key = create_api_key(session, name="raced", role="admin")
    cache = ApiKeyCache(engine, None)
    with engine.connect() as connection:
        cache.reload(connection)
    cache._keys.clear()
    raced = False

    def revoke_and_reload(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # Right after the miss read the row (still active): another process revokes the key and this
        # process's refresh reloads, before the miss stores what it read.
        nonlocal raced
        if raced or "FROM api_keys" not in statement or "WHERE" not in statement:
            return
        raced = True
        with engine.begin() as other:
            other.execute(
                update(ApiKey).where(ApiKey.key_hash == hash_secret(key)).values(revoked_at=utcnow())
            )
        with engine.connect() as other:
            cache.reload(other)

    event.listen(engine, "after_cursor_execute", revoke_and_reload)
    try:
        with pytest.raises(Unauthorized):
            cache.authenticate(key, load=True)
    finally:
        event.remove(engine, "after_cursor_execute", revoke_and_reload)
    assert raced
    with pytest.raises(Unauthorized):
        cache.authenticate(key, load=False)  # the cache holds the revoked row, not the stale one


def test_an_unknown_key_is_refused_and_not_cached(engine: Engine) -> None:
    cache = ApiKeyCache(engine, None)

    assert cache.authenticate("pck_unknown", load=False) is None  # the caller must look it up
    with pytest.raises(Unauthorized, match="unknown or revoked"):
        cache.authenticate("pck_unknown", load=True)
    with pytest.raises(Unauthorized, match="missing API key"):
        cache.authenticate(None, load=True)
    assert cache._keys == {}


def test_an_empty_bootstrap_setting_admits_nobody(engine: Engine) -> None:
    cache = ApiKeyCache(engine, "")

    with pytest.raises(Unauthorized):
        cache.authenticate("", load=True)
    assert cache.bootstrap_configured is False


def test_a_failed_flush_keeps_the_times_for_the_next(engine: Engine) -> None:
    with Session(engine) as session:
        key = create_api_key(session, name="used", role="viewer")
    cache = ApiKeyCache(engine, None)
    principal = cache.authenticate(key, load=True)
    assert principal is not None
    unreachable = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")

    with pytest.raises(OperationalError):
        cache.flush(unreachable)
    unreachable.dispose()

    assert cache.flush(engine) == 1
    with Session(engine) as session:
        row = session.get(ApiKey, int(principal.name.split(":")[1]))
    assert row is not None and row.last_used_at is not None
