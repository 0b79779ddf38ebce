"""The admin and agent APIs as tests speak them, over any httpx client.

The same classes serve the manager in-process (FastAPI's `TestClient`, an `httpx.Client`) and the
manager in its own process (`tests.support.processes.Manager`: an `httpx.Client` with its URL as
`base_url`). Every call states the status it expects and fails the test with the answer otherwise.

- `Admin`: the admin API under `/api/v1` with an admin key, plus shortcuts that read like the
  operator's actions (`root`, `group`, `policy`, `assign`, `effective`, `enroll`, ...).
- `AgentClient`: an enrolled agent speaking the agent API (`heartbeat`, `raw`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx

ADMIN_KEY = "pck_test-admin-key"
"""The bootstrap admin key of the in-process manager (`tests.conftest.settings`)."""


class Admin:
    """The admin API with an admin key; every call states the status it expects."""

    def __init__(self, client: httpx.Client, key: str = ADMIN_KEY) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {key}"}

    def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        response = self.client.request(method, f"/api/v1{path}", headers=headers, **kwargs)
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
        root: dict[str, Any] = next(g for g in self.get("/groups") if g["parent_id"] is None)
        return root

    def group(self, name: str, parent_id: int, inherit: bool = True) -> dict[str, Any]:
        group: dict[str, Any] = self.post(
            "/groups", {"name": name, "parent_id": parent_id, "inherit": inherit}
        )
        return group

    def policy(self, name: str, type: str, body: dict[str, Any]) -> dict[str, Any]:
        policy: dict[str, Any] = self.post("/policies", {"name": name, "type": type, "body": body})
        return policy

    def assign(self, group_id: int, policy: dict[str, Any], location_id: int | None = None) -> None:
        """Assign `policy` (as `policy()` returns it) to the group, or to one of its locations."""
        where = f"/groups/{group_id}" + (f"/locations/{location_id}" if location_id is not None else "")
        self.put(f"{where}/policies/{policy['type']}", {"policy_id": policy["id"]})

    def communication(self, group_id: int, **settings: Any) -> dict[str, Any]:
        """Set the group's communications settings (mode, heartbeat_s, ...)."""
        answer: dict[str, Any] = self.put(f"/groups/{group_id}/communication", settings)
        return answer

    def default_location(self, group_id: int) -> dict[str, Any]:
        default: dict[str, Any] = next(
            loc for loc in self.get(f"/groups/{group_id}/locations") if loc["is_default"]
        )
        return default

    def effective(self, group_id: int, location_id: int | None = None) -> dict[str, Any]:
        """The effective document of a (group, location), its Default when not given."""
        if location_id is None:
            location_id = self.default_location(group_id)["id"]
        doc: dict[str, Any] = self.get(f"/groups/{group_id}/locations/{location_id}/effective")["doc"]
        return doc

    def agent(self, agent_id: str) -> dict[str, Any]:
        """The operator's view of one agent."""
        view: dict[str, Any] = self.get(f"/agents/{agent_id}")
        return view

    def upload(self, data: bytes, expect: int = 201) -> str:
        """Upload a content blob under its SHA-256; return the digest."""
        digest = hashlib.sha256(data).hexdigest()
        self.call("PUT", f"/blobs/{digest}", expect, content=data)
        return digest

    def publish_content(self, kind: str, files: dict[str, bytes], expect: int = 201) -> Any:
        """Upload the files and publish them as the next revision of `kind`."""
        listed = [{"path": path, "sha256": self.upload(data)} for path, data in files.items()]
        return self.post(f"/content/{kind}/revisions", {"files": listed}, expect=expect)

    def enrollment_token(self, group_id: int) -> str:
        return str(self.post(f"/groups/{group_id}/enrollment-tokens", {})["token"])

    def join_token(self, group_id: int) -> str:
        """An enrolment token with the CA hash in it (`<token>.sha256:<hex>`), as `policycast admin
        enroll-token` prints it; the bare token from a manager serving plain HTTP."""
        return str(self.post(f"/groups/{group_id}/enrollment-tokens", {})["join_token"])

    def enroll(
        self, group_id: int | None = None, hostname: str = "host-1", facts: dict[str, Any] | None = None
    ) -> AgentClient:
        """Enrol an agent in the group (the root when not given) through the agent API."""
        group = group_id if group_id is not None else self.root()["id"]
        body = {"token": self.enrollment_token(group), "hostname": hostname, "facts": facts or {}}
        response = self.client.post("/agent/v1/enroll", json=body)
        assert response.status_code == 200, response.text
        return AgentClient(self.client, response.json())


class AgentClient:
    """An enrolled agent speaking the agent API."""

    def __init__(self, client: httpx.Client, enrolment: dict[str, Any]) -> None:
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
