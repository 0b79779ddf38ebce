"""The manager in-process (FastAPI's TestClient runs the real lifespan against a real database).

`Admin` and `AgentClient` are `tests.support.clients`' (imported here too, for tests that import them
from this module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.heartbeat import fast_path
from api.main import create_app
from fabric_core.settings import Settings
from tests.support.clients import ADMIN_KEY, Admin, AgentClient
from tests.support.databases import fresh_database

__all__ = ["Admin", "AgentClient"]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
) -> Iterator[TestClient]:
    """One in-process manager for a whole module, on each backend: for tests whose requests are refused
    (and so change nothing) or whose changes do not matter to the next test, where a manager per test
    would cost most of the run. A module that uses it must not use `client` (see
    `tests.support.databases`)."""
    data_dir = tmp_path_factory.mktemp("shared") / "data"
    postgres = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    url = fresh_database(request.param, data_dir, sqlite_template=sqlite_template, postgres_url=postgres)
    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        bootstrap_admin_key=ADMIN_KEY,
        heartbeat_flush_s=0.2,
        cache_refresh_s=0.2,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def admin(client: TestClient) -> Admin:
    return Admin(client)


@pytest.fixture
def enroll(admin: Admin) -> Callable[..., AgentClient]:
    """`enroll(group_id=None, hostname="host-1")`: an agent enrolled in the group (the root if None)."""
    return admin.enroll


@pytest.fixture
def answered_fast(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bodies of the heartbeats the ASGI fast path answered (the others went to the route)."""
    seen: list[bytes] = []
    real = fast_path.fast_heartbeat

    def spy(fabric: Any, authorization: bytes, body: bytes) -> bytes | None:
        answer = real(fabric, authorization, body)
        if answer is not None:
            seen.append(body)
        return answer

    monkeypatch.setattr(fast_path, "fast_heartbeat", spy)
    return seen
