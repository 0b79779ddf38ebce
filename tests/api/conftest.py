"""The manager in-process (FastAPI's TestClient runs the real lifespan against a real database)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.heartbeat import fast_path
from api.main import create_app
from fabric_core.settings import Settings
from tests.conftest import ADMIN_KEY


class Admin:
    """The admin API with an admin key; every call states the status it expects."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        response = self.client.request(method, f"/api/v1{path}", headers=self.headers, **kwargs)
        assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def get(self, path: str, expect: int = 200, **kwargs: Any) -> Any:
        return self.call("GET", path, expect, **kwargs)

    def post(self, path: str, json: Any, expect: int = 201) -> Any:
        return self.call("POST", path, expect, json=json)

    def put(self, path: str, json: Any, expect: int = 200) -> Any:
        return self.call("PUT", path, expect, json=json)

    def patch(self, path: str, json: Any, expect: int = 200) -> Any:
        return self.call("PATCH", path, expect, json=json)

    def delete(self, path: str, expect: int = 204) -> Any:
        return self.call("DELETE", path, expect)

    # --- shortcuts that read like the operator's actions ---

    def root(self) -> dict[str, Any]:
        return next(g for g in self.get("/groups") if g["parent_id"] is None)

    def group(self, name: str, parent_id: int, inherit: bool = True) -> dict[str, Any]:
        return self.post("/groups", {"name": name, "parent_id": parent_id, "inherit": inherit})

    def policy(self, name: str, type: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.post("/policies", {"name": name, "type": type, "body": body})

    def default_location(self, group_id: int) -> dict[str, Any]:
        return next(loc for loc in self.get(f"/groups/{group_id}/locations") if loc["is_default"])

    def effective(self, group_id: int, location_id: int | None = None) -> dict[str, Any]:
        if location_id is None:
            location_id = self.default_location(group_id)["id"]
        doc: dict[str, Any] = self.get(f"/groups/{group_id}/locations/{location_id}/effective")["doc"]
        return doc


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def admin(client: TestClient) -> Admin:
    return Admin(client)


class AgentClient:
    """An enrolled agent speaking the agent API."""

    def __init__(self, client: TestClient, enrolment: dict[str, Any]) -> None:
        self.client = client
        self.id: str = enrolment["agent_id"]
        self.group_id: int = enrolment["group_id"]
        self.enrolment = enrolment
        self.headers = {"Authorization": f"Bearer {enrolment['secret']}"}

    def heartbeat(self, body: dict[str, Any] | None = None, expect: int = 200, **fields: Any) -> Any:
        payload = body if body is not None else {"serial": 0, "mode": "pull", **fields}
        response = self.client.post("/agent/v1/heartbeat", json=payload, headers=self.headers)
        assert response.status_code == expect, response.text
        return response.json()

    def raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)


@pytest.fixture
def enroll(admin: Admin, client: TestClient) -> Any:
    def _enroll(group_id: int | None = None, hostname: str = "host-1") -> AgentClient:
        group = group_id if group_id is not None else admin.root()["id"]
        token = admin.post(f"/groups/{group}/enrollment-tokens", {})["token"]
        response = client.post("/agent/v1/enroll", json={"token": token, "hostname": hostname, "facts": {}})
        assert response.status_code == 200, response.text
        return AgentClient(client, response.json())

    return _enroll


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
