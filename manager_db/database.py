"""The database: engines, sessions and migrations. The only module that builds engines.

SQLite (the default, a file in the data directory) gets WAL and a busy timeout so that heartbeat
readers run while an operator change writes; PostgreSQL gets a connection pool that checks each
connection before use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, create_engine

from fabric_core.console import fail

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
T = TypeVar("T")


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


def describe(url: str) -> str:
    """A database URL fit to print: without the user and password."""
    return url.rsplit("@", maxsplit=1)[-1] if "@" in url else url


def require_schema(engine: Engine) -> None:
    """`ValueError` unless the database holds Policycast's schema (for processes that do not migrate)."""
    if "fabric_counters" not in inspect(engine).get_table_names():
        raise ValueError(
            "the database has no Policycast schema yet: run `policycast serve` or `policycast admin migrate`"
        )


def guarded(action: Callable[[], T], what: str) -> T:
    """Run a command's `action`; turn what an operator can fix into a one-line failure."""
    try:
        return action()
    except OperationalError as exc:
        fail(f"{what}: cannot reach the database ({exc.orig})")
    except ValueError as exc:
        fail(f"{what}: {exc}")
