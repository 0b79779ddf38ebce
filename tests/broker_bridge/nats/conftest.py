"""NATS engine tests: real nats-server clusters (tests.support.nats), one per module, and an agents
table to rebuild revocations from."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from manager_db.database import make_engine
from manager_db.models import Group
from tests.support.databases import fresh_database
from tests.support.nats import nats_cluster, nats_node  # noqa: F401  (the fixtures)


@pytest.fixture
def database(tmp_path: Path, sqlite_template: Path) -> Engine:
    """An empty SQLite agents table with a root group (id 1)."""
    url = fresh_database("sqlite", tmp_path / "db", sqlite_template=sqlite_template, postgres_url=None)
    engine = make_engine(url)
    with Session(engine) as session:
        session.add(Group(id=1, name="root"))
        session.commit()
    return engine
