"""The lifecycle of admin API keys: create (shown once), list (never the secret), expire, revoke, last
used; the bootstrap key's retirement; every change audited."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text
from sqlmodel import Session, col, select

from api import key_cache
from api.main import create_app
from api.routes import api_keys as api_keys_routes
from fabric_core.settings import Settings
from manager_db.models import ApiKey, AuditEntry, utcnow
from tests.support.clients import ADMIN_KEY, Admin
from tests.support.waiting import wait_for


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create(admin: Admin, role: str = "admin", **fields: Any) -> dict[str, Any]:
    made: dict[str, Any] = admin.post("/api-keys", {"role": role, **fields})
    return made


def audit(client: TestClient) -> list[AuditEntry]:
    with Session(client.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        return list(session.exec(select(AuditEntry).order_by(col(AuditEntry.id))).all())


def test_a_new_key_is_shown_once_and_works(client: TestClient, admin: Admin) -> None:
    made = create(admin, "viewer", name="dashboard")

    assert made["key"].startswith("pck_")
    assert made["role"] == "viewer" and made["name"] == "dashboard"
    assert made["expires_at"] is None and made["revoked_at"] is None and made["active"] is True
    assert client.get("/api/v1/groups", headers=bearer(made["key"])).status_code == 200
    listed = admin.get("/api-keys")
    assert [k["id"] for k in listed] == [made["id"]]
    assert "key" not in listed[0]


def test_the_list_never_shows_a_secret(client: TestClient, admin: Admin) -> None:
    made = [create(admin, "admin", name="alice"), create(admin, "viewer", name="bob")]

    response = client.get("/api/v1/api-keys", headers=admin.headers)

    assert response.status_code == 200
    assert {k["name"] for k in response.json()} == {"alice", "bob"}
    for key in made:
        assert key["key"] not in response.text
        assert key["key"].split("_", 1)[1] not in response.text
    with Session(client.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        hashes = session.exec(select(ApiKey.key_hash)).all()
    assert hashes and all(h not in response.text for h in hashes)
    fields = set(response.json()[0])
    assert fields == {
        "id",
        "name",
        "role",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "active",
    }


def test_a_revoked_key_is_refused_at_once(client: TestClient, admin: Admin) -> None:
    made = create(admin, name="ci")
    assert client.get("/api/v1/groups", headers=bearer(made["key"])).status_code == 200

    admin.delete(f"/api-keys/{made['id']}")

    response = client.get("/api/v1/groups", headers=bearer(made["key"]))
    assert response.status_code == 401
    assert response.json() == {"detail": "unknown or revoked API key"}
    (listed,) = admin.get("/api-keys")
    assert listed["revoked_at"] is not None and listed["active"] is False
    # and it can do nothing: a change with it is refused before anything happens
    before = admin.get("/groups")
    refused = client.post("/api/v1/groups", json={"name": "x", "parent_id": 1}, headers=bearer(made["key"]))
    assert refused.status_code == 401
    assert admin.get("/groups") == before


def test_revoking_what_is_not_there(admin: Admin) -> None:
    made = create(admin)
    admin.delete(f"/api-keys/{made['id']}")

    assert "already revoked" in admin.delete(f"/api-keys/{made['id']}", expect=409)["detail"]
    assert admin.delete("/api-keys/999", expect=404) == {"detail": "no API key 999"}
    admin.delete("/api-keys/0", expect=422)
    admin.delete("/api-keys/not-a-number", expect=422)
    admin.delete(f"/api-keys/{2**63}", expect=422)


@pytest.mark.parametrize(
    "body",
    [
        {"role": "root"},
        {},
        {"role": "admin", "expires_in_s": 59},
        {"role": "admin", "expires_in_s": 365 * 86400 + 1},
        {"role": "admin", "expires_in_s": "soon"},
        {"role": "admin", "name": ""},
        {"role": "admin", "name": "x" * 129},
        {"role": "admin", "name": "nul\x00"},
        {"role": "admin", "bogus": 1},
        {"role": "admin", "key": "pck_chosen-by-the-caller"},
    ],
    ids=[
        "unknown-role",
        "no-role",
        "too-short",
        "too-long",
        "not-a-number",
        "empty-name",
        "long-name",
        "nul-in-name",
        "unknown-field",
        "caller-chosen-key",
    ],
)
def test_a_bad_request_creates_no_key(client: TestClient, admin: Admin, body: dict[str, Any]) -> None:
    answer = admin.post("/api-keys", body, expect=422)

    assert answer["detail"]
    assert admin.get("/api-keys") == []
    assert [e.action for e in audit(client) if e.action.startswith("api_key")] == []


def test_a_key_expires(client: TestClient, admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    made = create(admin, name="temp", expires_in_s=60)
    expires_at = datetime.fromisoformat(made["expires_at"])
    assert (
        timedelta(seconds=59)
        < expires_at - datetime.fromisoformat(made["created_at"])
        <= timedelta(seconds=61)
    )
    assert client.get("/api/v1/groups", headers=bearer(made["key"])).status_code == 200

    later = lambda: utcnow() + timedelta(seconds=61)  # noqa: E731
    monkeypatch.setattr(key_cache, "utcnow", later)
    monkeypatch.setattr(api_keys_routes, "utcnow", later)

    response = client.get("/api/v1/groups", headers=bearer(made["key"]))
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]
    assert admin.get("/api-keys")[0]["active"] is False


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api-keys", None),
        ("POST", "/api-keys", {"role": "admin"}),
        ("DELETE", "/api-keys/{id}", None),
        ("GET", "/api-keys/bootstrap", None),
        ("DELETE", "/api-keys/bootstrap", None),
    ],
)
def test_a_viewer_cannot_manage_keys(
    client: TestClient, admin: Admin, method: str, path: str, body: Any
) -> None:
    viewer = create(admin, "viewer", name="viewer")
    other = create(admin, "admin", name="other")

    response = client.request(
        method, f"/api/v1{path.format(id=other['id'])}", json=body, headers=bearer(viewer["key"])
    )

    assert response.status_code == 403, response.text
    assert "viewer" in response.json()["detail"]
    assert [(k["id"], k["active"]) for k in admin.get("/api-keys")] == [
        (viewer["id"], True),
        (other["id"], True),
    ]
    assert admin.get("/api-keys/bootstrap")["retired"] is False


def test_an_admin_key_manages_keys_and_is_audited_without_secrets(client: TestClient, admin: Admin) -> None:
    first = create(admin, name="first")
    as_first = Admin(client, first["key"])

    second = create(as_first, "viewer", name="second", expires_in_s=3600)
    as_first.delete(f"/api-keys/{second['id']}")

    rows = [(e.actor, e.action, e.target) for e in audit(client) if e.action.startswith("api_key")]
    assert rows == [
        ("bootstrap", "api_key.create", f"api_key:{first['id']}"),
        (f"key:{first['id']}:first", "api_key.create", f"api_key:{second['id']}"),
        (f"key:{first['id']}:first", "api_key.revoke", f"api_key:{second['id']}"),
    ]
    with client.app.state.fabric.engine.connect() as connection:  # type: ignore[attr-defined]
        stored = " ".join(str(row) for row in connection.execute(text("SELECT * FROM audit_log")))
    for key in (first["key"], second["key"]):
        assert key not in stored and key.split("_", 1)[1] not in stored


def test_the_bootstrap_key_can_be_retired(client: TestClient, admin: Admin, settings: Settings) -> None:
    assert admin.get("/api-keys/bootstrap") == {
        "configured": True,
        "retired": False,
        "retired_at": None,
        "retired_by": None,
    }
    refused = admin.delete("/api-keys/bootstrap", expect=409)["detail"]
    assert "no usable admin API key" in refused  # retiring it now would lock everyone out
    assert client.get("/api/v1/groups", headers=admin.headers).status_code == 200
    viewer = create(admin, "viewer")
    assert "no usable admin API key" in admin.delete("/api-keys/bootstrap", expect=409)["detail"]
    successor = create(admin, "admin", name="successor")

    admin.delete("/api-keys/bootstrap")

    response = client.get("/api/v1/groups", headers=admin.headers)
    assert response.status_code == 401
    assert "bootstrap admin key has been retired" in response.json()["detail"]
    as_successor = Admin(client, successor["key"])
    state = as_successor.get("/api-keys/bootstrap")
    assert state["retired"] is True and state["retired_by"] == "bootstrap" and state["configured"] is True
    assert "already retired" in as_successor.delete("/api-keys/bootstrap", expect=409)["detail"]
    assert client.get("/api/v1/groups", headers=bearer(viewer["key"])).status_code == 200
    actions = [(e.actor, e.action, e.target) for e in audit(client) if e.action.startswith("bootstrap")]
    assert actions == [("bootstrap", "bootstrap_key.retire", "api_key:bootstrap")]

    # A restart with the environment still setting it: still refused.
    with TestClient(create_app(settings)) as restarted:
        again = restarted.get("/api/v1/groups", headers=bearer(ADMIN_KEY))
        assert again.status_code == 401
        assert "retired" in again.json()["detail"]
        assert restarted.get("/api/v1/groups", headers=bearer(successor["key"])).status_code == 200


def test_an_expired_admin_key_cannot_stand_in_for_the_bootstrap_key(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    create(admin, "admin", expires_in_s=60)
    monkeypatch.setattr("api.services.api_keys.utcnow", lambda: utcnow() + timedelta(seconds=61))

    assert "no usable admin API key" in admin.delete("/api-keys/bootstrap", expect=409)["detail"]


@pytest.fixture
def slow_flush(settings: Settings) -> Settings:
    """Settings whose background flushes do not run during the test: the test flushes by hand."""
    return settings.model_copy(update={"heartbeat_flush_s": 3600})


def test_last_used_is_kept_without_a_write_per_request(slow_flush: Settings) -> None:
    with TestClient(create_app(slow_flush)) as client:
        admin = Admin(client)
        made = create(admin, "viewer", name="reader")
        fabric = client.app.state.fabric  # type: ignore[attr-defined]
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        event.listen(fabric.engine, "before_cursor_execute", seen)
        try:
            for _ in range(20):
                assert client.get("/api/v1/policies", headers=bearer(made["key"])).status_code == 200
        finally:
            event.remove(fabric.engine, "before_cursor_execute", seen)
        assert [s for s in statements if "api_keys" in s] == []  # no lookup, no write

        listed = {k["id"]: k for k in admin.get("/api-keys")}
        assert listed[made["id"]]["last_used_at"] is not None  # this replica's own, not written yet
        with Session(fabric.engine) as session:
            assert session.get(ApiKey, made["id"]).last_used_at is None  # type: ignore[union-attr]

        assert fabric.keys.flush(fabric.engine) == 1  # the reader (the bootstrap key has no row)

        with Session(fabric.engine) as session:
            stored = session.get(ApiKey, made["id"])
        assert stored is not None and stored.last_used_at is not None
        assert fabric.keys.flush(fabric.engine) == 0


def test_last_used_reaches_the_database_in_the_background(client: TestClient, admin: Admin) -> None:
    made = create(admin, "viewer")
    assert client.get("/api/v1/groups", headers=bearer(made["key"])).status_code == 200
    engine = client.app.state.fabric.engine  # type: ignore[attr-defined]

    def stored() -> datetime | None:
        with Session(engine) as session:
            row = session.get(ApiKey, made["id"])
            return None if row is None else row.last_used_at

    wait_for(stored, timeout=10, what="the batched last-used write")


def test_no_secret_is_logged(client: TestClient, admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        made = create(admin, "admin")
        client.get("/api/v1/groups", headers=bearer(made["key"]))
        client.get("/api/v1/groups", headers=bearer("pck_wrong-secret"))
        admin.delete(f"/api-keys/{made['id']}")
        client.get("/api/v1/groups", headers=bearer(made["key"]))

    for secret in (made["key"], "pck_wrong-secret", ADMIN_KEY):
        assert secret not in caplog.text
