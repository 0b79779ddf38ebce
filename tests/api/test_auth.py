"""Admin API authentication and roles: `Authorization: Bearer <key>`, admin or viewer, keys stored hashed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from api.security import Role, hash_secret
from api.services.api_keys import create_api_key
from manager_db.models import ApiKey


def new_key(client: Any, role: Role, name: str = "operator") -> str:
    with Session(client.app.state.fabric.engine) as session:
        return create_api_key(session, name=name, role=role)


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def state(admin: Any) -> dict[str, Any]:
    """What an operator change would alter."""
    groups = admin.get("/groups")
    return {
        "groups": groups,
        "policies": admin.get("/policies"),
        "agents": [(a["id"], a["group_id"], a["revoked"]) for a in admin.get("/agents")],
        "locations": {g["id"]: admin.get(f"/groups/{g['id']}/locations") for g in groups},
        "communication": {g["id"]: admin.get(f"/groups/{g['id']}/communication") for g in groups},
        "documents": {g["id"]: admin.effective(g["id"])["serial"] for g in groups},
    }


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer pck_unknown"},
        {"Authorization": "Bearer "},
        {"Authorization": "pck_test-admin-key"},  # the right key without the scheme
    ],
    ids=["no-key", "unknown-key", "empty-key", "no-scheme"],
)
def test_admin_api_refuses_missing_or_unknown_keys(client, admin, headers):
    before = state(admin)
    for method, path, body in (
        ("GET", "/api/v1/groups", None),
        ("GET", "/api/v1/agents", None),
        ("POST", "/api/v1/groups", {"name": "x", "parent_id": admin.root()["id"]}),
    ):
        response = client.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["detail"]
    assert state(admin) == before


def test_an_agent_secret_is_not_an_api_key(client, enroll):
    agent = enroll()

    response = client.get("/api/v1/groups", headers=agent.headers)

    assert response.status_code == 401


def test_an_api_key_is_not_an_agent_secret(client, admin):
    response = client.post("/agent/v1/heartbeat", json={"serial": 0, "mode": "pull"}, headers=admin.headers)

    assert response.status_code == 401


def test_viewer_can_read_everything(client, admin, enroll):
    root = admin.root()["id"]
    agent = enroll()
    viewer = as_key(new_key(client, "viewer"))
    location = admin.default_location(root)["id"]

    for path in (
        "/groups",
        f"/groups/{root}",
        f"/groups/{root}/locations",
        f"/groups/{root}/locations/{location}/effective",
        f"/groups/{root}/communication",
        "/policies",
        "/agents",
        f"/agents/{agent.id}",
        f"/agents/{agent.id}/logs",
        f"/groups/{root}/logs",
    ):
        response = client.get(f"/api/v1{path}", headers=viewer)
        assert response.status_code == 200, (path, response.text)
        assert response.json() == admin.get(path), path


def test_viewer_cannot_change_anything(client, admin, enroll):
    root = admin.root()["id"]
    child = admin.group("Child", root, inherit=False)
    location = admin.default_location(root)["id"]
    policy = admin.policy("Firewall", "firewall", {"rules": []})
    admin.put(f"/groups/{root}/policies/firewall", {"policy_id": policy["id"]})
    agent = enroll()
    viewer = as_key(new_key(client, "viewer"))
    before = state(admin)

    for method, path, body in (
        ("POST", "/groups", {"name": "x", "parent_id": root}),
        ("PATCH", f"/groups/{child['id']}", {"name": "renamed"}),
        ("DELETE", f"/groups/{child['id']}", None),
        ("POST", f"/groups/{root}/locations", {"name": "Office", "conditions": []}),
        ("PATCH", f"/groups/{root}/locations/{location}", {"name": "Elsewhere"}),
        ("POST", "/policies", {"name": "AV", "type": "antivirus", "body": {}}),
        ("PUT", f"/policies/{policy['id']}", {"body": {"rules": ["deny"]}}),
        ("DELETE", f"/policies/{policy['id']}", None),
        ("PUT", f"/groups/{child['id']}/policies/firewall", {"policy_id": policy["id"]}),
        ("DELETE", f"/groups/{root}/policies/firewall", None),
        ("PUT", f"/groups/{root}/communication", {"heartbeat_s": 60}),
        ("PUT", f"/groups/{root}/locations/{location}/communication", {"use_group_settings": False}),
        ("POST", f"/groups/{root}/enrollment-tokens", {}),
        ("PATCH", f"/agents/{agent.id}", {"group_id": child["id"]}),
        ("POST", f"/agents/{agent.id}/update-now", None),
        ("DELETE", f"/agents/{agent.id}", None),
    ):
        response = client.request(method, f"/api/v1{path}", json=body, headers=viewer)
        assert response.status_code == 403, (method, path, response.text)
        assert "viewer" in response.json()["detail"]

    assert state(admin) == before
    assert agent.heartbeat(serial=0)["changed"] is True  # not revoked, not moved


def test_an_admin_key_can_change_state(client, admin):
    key = as_key(new_key(client, "admin"))
    root = admin.root()["id"]

    response = client.post("/api/v1/groups", json={"name": "Made by key", "parent_id": root}, headers=key)

    assert response.status_code == 201, response.text
    assert "Made by key" in [g["name"] for g in admin.get("/groups")]
    deleted = client.delete(f"/api/v1/groups/{response.json()['id']}", headers=key)
    assert deleted.status_code == 204


def test_a_revoked_key_stops_working(client, admin):
    key = new_key(client, "admin")
    assert client.get("/api/v1/groups", headers=as_key(key)).status_code == 200
    with Session(client.app.state.fabric.engine) as session:
        row = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_secret(key))).one()
    admin.delete(f"/api-keys/{row.id}")

    response = client.get("/api/v1/groups", headers=as_key(key))

    assert response.status_code == 401
    assert response.json()["detail"]


def test_keys_are_stored_hashed(client):
    keys = [new_key(client, "admin", "alice"), new_key(client, "viewer", "bob")]

    with client.app.state.fabric.engine.connect() as connection:
        rows = [
            tuple(str(value) for value in row) for row in connection.execute(text("SELECT * FROM api_keys"))
        ]

    assert len(rows) == 2
    stored = " ".join(" ".join(row) for row in rows)
    for key in keys:
        assert key not in stored
        assert key.split("_", 1)[1] not in stored  # not even without its prefix
        assert hash_secret(key) in stored
