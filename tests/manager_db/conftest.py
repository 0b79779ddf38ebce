"""The manager's schema with one group and three agents (a1, a2, revoked), on each backend: what the
sightings and convergence tests record against."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from manager_db.database import make_engine
from manager_db.models import Agent, Group


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    with Session(engine) as session:
        group = Group(name="My Company", parent_id=None, inherit=False)
        session.add(group)
        session.commit()
        assert group.id is not None
        for name in ("a1", "a2", "revoked"):
            session.add(Agent(id=name, hostname=name, group_id=group.id, secret_hash=f"hash-{name}"))
        session.commit()
    yield engine
    engine.dispose()
