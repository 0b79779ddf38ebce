"""The manager in-process (FastAPI's TestClient runs the real lifespan against a real database).

`Admin` and `AgentClient` are `tests.support.clients`' (imported here too, for tests that import them
from this module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.heartbeat import fast_path
from api.main import create_app
from fabric_core.settings import Settings
from tests.support.clients import Admin, AgentClient

__all__ = ["Admin", "AgentClient"]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
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
