"""Shared fixtures: a database per test on SQLite or a throw-away PostgreSQL database, and settings.

PostgreSQL: the suite creates one database per run on POLICYCAST_TEST_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/test, the development machines' server), empties it between tests,
and drops it at the end. If no server answers, PostgreSQL tests fail with a message saying so; set
POLICYCAST_TEST_POSTGRES=skip to skip them on purpose (the summary then lists them as skipped).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

from fabric_core.settings import Settings
from manager_db import models as _models  # noqa: F401 - registers the tables in SQLModel.metadata
from manager_db.database import make_engine, migrate
from tests.support.clients import ADMIN_KEY

pytest_plugins = ["tests.support.broker"]

# Bridges made in-process (`Settings()` reads the environment) serve their metrics on a free port,
# never the fixed default one: tests run side by side. `tests.support.processes` does the same for
# child processes.
os.environ.setdefault("POLICYCAST_BRIDGE_METRICS_PORT", "0")

POSTGRES_URL = os.environ.get("POLICYCAST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TABLES = ", ".join(table.name for table in SQLModel.metadata.sorted_tables)
"""Every table of the schema (the models', which the migrations test keeps equal to the migrated one):
emptied between PostgreSQL tests, so that a new table cannot be forgotten here."""


def _psycopg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL database for this run, migrated once."""
    if os.environ.get("POLICYCAST_TEST_POSTGRES") == "skip":
        pytest.skip("PostgreSQL tests skipped on purpose: POLICYCAST_TEST_POSTGRES=skip")
    admin_dsn = _psycopg_dsn(POSTGRES_URL)
    name = f"policycast_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc}).\n"
            "Start it, point POLICYCAST_TEST_POSTGRES_URL at one, or set POLICYCAST_TEST_POSTGRES=skip.",
            pytrace=False,
        )
    url = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg", database=name)
    rendered = url.render_as_string(hide_password=False)
    engine = make_engine(rendered)
    migrate(engine)
    engine.dispose()
    yield rendered
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("template") / "policycast.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    with engine.connect() as connection:
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    engine.dispose()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    """A fresh, migrated, empty database on each backend."""
    from tests.support.databases import fresh_database

    postgres = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    return fresh_database(
        request.param, tmp_path / "data", sqlite_template=sqlite_template, postgres_url=postgres
    )


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        bootstrap_admin_key=ADMIN_KEY,
        heartbeat_flush_s=0.2,
        cache_refresh_s=0.2,
    )
