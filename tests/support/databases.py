"""A fresh, migrated, empty database on either backend, for fixtures of any scope.

`tests.conftest.database_url` gives every test its own (function scope). `fresh_database` does the same
for a fixture that lives longer, such as a manager shared by a whole module (`tests.api.conftest.
shared_client`): SQLite is a copy of the session's migrated template, PostgreSQL the session's
throw-away database, emptied. The PostgreSQL database is one per run, so a module that holds it in a
longer-lived fixture must not also use the function-scoped `database_url` (it empties the database
before each test).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import text

from manager_db.database import make_engine


def fresh_database(backend: str, directory: Path, *, sqlite_template: Path, postgres_url: str | None) -> str:
    """The URL of an empty, migrated database: a copy of `sqlite_template` in `directory`, or
    `postgres_url` emptied (`backend` is "sqlite" or "postgres")."""
    from tests.conftest import TABLES

    if backend == "sqlite":
        path = directory / "policycast.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    assert postgres_url is not None
    engine = make_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
        connection.execute(text("INSERT INTO fabric_counters (id, serial, generation) VALUES (1, 0, 0)"))
    engine.dispose()
    return postgres_url
