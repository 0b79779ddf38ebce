"""The database: engine, sessions, migrations and the change lock. The only module that builds engines.

Every operator change runs in one transaction that starts with `begin_change`, which bumps the
generation counter. On PostgreSQL that row lock serialises changes (so two recomputations never race);
on SQLite it takes the write lock before anything is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url
from sqlmodel import Session, create_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets heartbeat readers run while an operator change writes; foreign keys are off by default.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def begin_change(session: Session) -> int:
    """Take the change lock for this transaction; return the new generation."""
    row = session.execute(
        text("UPDATE fabric_counters SET generation = generation + 1 WHERE id = 1 RETURNING generation")
    ).one()
    return int(row[0])


def allocate_serials(session: Session, count: int) -> range:
    """Reserve `count` consecutive serials from the global counter (inside a change)."""
    row = session.execute(
        text("UPDATE fabric_counters SET serial = serial + :n WHERE id = 1 RETURNING serial"), {"n": count}
    ).one()
    last = int(row[0])
    return range(last - count + 1, last + 1)


def read_counters(session: Session) -> tuple[int, int]:
    row = session.execute(text("SELECT serial, generation FROM fabric_counters WHERE id = 1")).one()
    return int(row[0]), int(row[1])


def read_counters_outside(engine: Engine) -> tuple[int, int]:
    """(serial, generation), read in a short transaction of its own."""
    with Session(engine) as session:
        return read_counters(session)
