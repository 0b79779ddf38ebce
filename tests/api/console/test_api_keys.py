"""The console's API Keys page, in-process: the keys (name, role, created, last used, expires, revoked),
Add an API key (its secret shown once, with a warning), Revoke, and the bootstrap key's state with
Retire the bootstrap key; viewers see the list only; every write CSRF-checked and read back through the
admin API."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from html import unescape
from typing import Any

import pytest
from fastapi.testclient import TestClient

from manager_db.models import utcnow
from tests.support.clients import ADMIN_KEY, Admin
from tests.support.console import field_error, page_message, signed_in, write_controls


def create(admin: Admin, role: str, name: str, **more: Any) -> dict[str, Any]:
    made: dict[str, Any] = admin.post("/api-keys", {"role": role, "name": name, **more})
    return made


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def row(html: str, key_id: int) -> str:
    """One key's row of the list."""
    found = re.search(rf'<tr data-key-id="{key_id}">(.*?)</tr>', html, re.S)
    assert found, f"no row for key {key_id}"
    return found.group(1)


def test_the_list_shows_every_key_and_the_bootstrap_keys_state(client: TestClient, admin: Admin) -> None:
    viewer = create(admin, "viewer", "dashboard", expires_in_s=7 * 86400)
    old = create(admin, "admin", "old-admin")
    admin.delete(f"/api-keys/{old['id']}")
    signed_in(client, ADMIN_KEY)

    page = client.get("/console/api-keys")

    assert page.status_code == 200
    assert 'href="/console/api-keys" aria-current="page"' in page.text
    dashboard = row(page.text, viewer["id"])
    assert '<th scope="row">dashboard</th>' in dashboard and "<td>viewer</td>" in dashboard
    assert "<td>Active</td>" in dashboard and ">never</td>" in dashboard  # never used yet
    assert datetime.fromisoformat(viewer["expires_at"]).strftime("%Y-%m-%d %H:%M") in dashboard
    assert 'aria-label="Revoke the API key dashboard' in dashboard
    revoked = row(page.text, old["id"])
    assert "<td>Revoked</td>" in revoked and "Revoke</button>" not in revoked
    assert "Accepted: this replica's environment sets POLICYCAST_BOOTSTRAP_ADMIN_KEY" in page.text
    assert "Retire the bootstrap key</button>" in page.text
    for label in ("Key name", "Role", "Expires after (days, optional)"):
        assert f">{label}</label>" in page.text
    assert viewer["key"] not in page.text  # never a secret in the list


def test_a_viewer_is_not_shown_the_keys_as_the_admin_api_does_not(client: TestClient, admin: Admin) -> None:
    viewer = create(admin, "viewer", "dashboard")
    signed_in(client, viewer["key"])

    home = client.get("/console/clients")
    page = client.get("/console/api-keys")

    assert 'href="/console/api-keys"' not in home.text
    assert page.status_code == 403 and "is a viewer: only admin keys may do this" in page.text
    assert "<table" not in page.text
    assert write_controls(page.text) == []


def test_a_viewers_forged_writes_are_refused_and_change_nothing(client: TestClient, admin: Admin) -> None:
    create(admin, "admin", "ops")  # so that the bootstrap key could be retired
    viewer = create(admin, "viewer", "dashboard")
    before = admin.get("/api-keys")
    csrf = signed_in(client, viewer["key"])

    answers = [
        client.post("/console/api-keys", data={"csrf_token": csrf, "name": "mine", "role": "admin"}),
        client.post(f"/console/api-keys/{viewer['id']}/revoke", data={"csrf_token": csrf}),
        client.post("/console/api-keys/bootstrap/retire", data={"csrf_token": csrf}),
    ]

    assert [answer.status_code for answer in answers] == [403, 403, 403]
    assert all("pck_" not in answer.text for answer in answers)
    assert [{**k, "last_used_at": None} for k in admin.get("/api-keys")] == [
        {**k, "last_used_at": None} for k in before
    ]
    assert admin.get("/api-keys/bootstrap")["retired"] is False


@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_a_write_without_the_sessions_csrf_token_is_refused(
    client: TestClient, admin: Admin, token: str | None
) -> None:
    ops = create(admin, "admin", "ops")
    signed_in(client, ADMIN_KEY)
    csrf = {} if token is None else {"csrf_token": token}

    answers = [
        client.post("/console/api-keys", data={**csrf, "name": "mine", "role": "admin"}),
        client.post(f"/console/api-keys/{ops['id']}/revoke", data=csrf),
        client.post("/console/api-keys/bootstrap/retire", data=csrf),
    ]

    assert [answer.status_code for answer in answers] == [403, 403, 403]
    assert [k["id"] for k in admin.get("/api-keys") if k["revoked_at"] is None] == [ops["id"]]
    assert admin.get("/api-keys/bootstrap")["retired"] is False


def test_add_an_api_key_shows_its_secret_once(client: TestClient, admin: Admin) -> None:
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(
        "/console/api-keys",
        data={"csrf_token": csrf, "name": " backup ", "role": "viewer", "expires_days": "30"},
    )

    assert answer.status_code == 201
    assert answer.headers["cache-control"] == "no-store"
    secret = re.search(r'id="new-key-secret" class="secret" value="(pck_[^"]+)"', answer.text)
    assert secret, answer.text
    key = unescape(secret.group(1))
    assert "Copy this key now: it is shown only this once" in answer.text
    assert '<label for="new-key-secret">The new API key</label>' in answer.text
    [made] = admin.get("/api-keys")
    assert (made["name"], made["role"], made["active"]) == ("backup", "viewer", True)
    expires = datetime.fromisoformat(made["expires_at"])
    assert abs(expires - (utcnow() + timedelta(days=30))) < timedelta(minutes=5)
    assert client.get("/api/v1/groups", headers=bearer(key)).status_code == 200  # the key works
    assert client.get("/api/v1/api-keys", headers=bearer(key)).status_code == 403  # as a viewer
    assert key not in client.get("/console/api-keys").text  # and is never shown again


def test_a_key_without_expiry_never_expires(client: TestClient, admin: Admin) -> None:
    csrf = signed_in(client, ADMIN_KEY)
    answer = client.post("/console/api-keys", data={"csrf_token": csrf, "name": "ops", "role": "admin"})
    assert answer.status_code == 201
    [made] = admin.get("/api-keys")
    assert (made["role"], made["expires_at"]) == ("admin", None)


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"name": ""}, "key-name", "at least 1 character"),
        ({"name": "a\tb"}, "key-name", "control characters"),
        ({"role": "root"}, "key-role", "Role must be admin or viewer"),
        ({"expires_days": "0"}, "key-expires", "from 1 to 365"),
        ({"expires_days": "366"}, "key-expires", "from 1 to 365"),
        ({"expires_days": "1.5"}, "key-expires", "whole number"),
        ({"expires_days": "9" * 40}, "key-expires", "longer than 32"),
    ],
)
def test_a_refused_key_is_shown_at_its_field_and_not_added(
    client: TestClient, admin: Admin, fields: dict[str, str], field: str, reason: str
) -> None:
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(
        "/console/api-keys", data={"csrf_token": csrf, "name": "ops", "role": "admin", **fields}
    )

    assert answer.status_code == 422
    assert reason in (field_error(answer.text, field) or "")
    assert "pck_" not in answer.text
    assert admin.get("/api-keys") == []


def test_revoke_a_key(client: TestClient, admin: Admin) -> None:
    ops = create(admin, "admin", "ops")
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(f"/console/api-keys/{ops['id']}/revoke", data={"csrf_token": csrf})

    assert answer.status_code == 200 and page_message(answer.text) == "API key revoked."
    assert "<td>Revoked</td>" in row(answer.text, ops["id"])
    assert admin.get("/api-keys")[0]["revoked_at"] is not None
    assert client.get("/api/v1/groups", headers=bearer(ops["key"])).status_code == 401

    again = client.post(f"/console/api-keys/{ops['id']}/revoke", data={"csrf_token": csrf})
    unknown = client.post("/console/api-keys/999/revoke", data={"csrf_token": csrf})
    assert again.status_code == 409 and "already revoked" in (page_message(again.text) or "")
    assert unknown.status_code == 404 and "no API key 999" in (page_message(unknown.text) or "")


def test_revoking_the_key_you_signed_in_with_ends_your_session(client: TestClient, admin: Admin) -> None:
    ops = create(admin, "admin", "ops")
    csrf = signed_in(client, ops["key"])

    answer = client.post(
        f"/console/api-keys/{ops['id']}/revoke", data={"csrf_token": csrf}, follow_redirects=True
    )

    assert answer.url.path == "/console/signin"
    assert admin.get("/api-keys")[0]["revoked_at"] is not None


def test_the_bootstrap_key_is_not_retired_while_no_admin_key_could_take_its_place(
    client: TestClient, admin: Admin
) -> None:
    create(admin, "viewer", "dashboard")
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post("/console/api-keys/bootstrap/retire", data={"csrf_token": csrf})

    assert answer.status_code == 409
    assert "no usable admin API key" in (page_message(answer.text) or "")
    assert admin.get("/api-keys/bootstrap")["retired"] is False


def test_retire_the_bootstrap_key(client: TestClient, admin: Admin) -> None:
    ops = create(admin, "admin", "ops")
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(
        "/console/api-keys/bootstrap/retire", data={"csrf_token": csrf}, follow_redirects=False
    )

    assert answer.status_code == 303
    # The session was opened with the bootstrap key: it ended with it.
    assert client.get(answer.headers["location"], follow_redirects=True).url.path == "/console/signin"
    state = Admin(client, ops["key"]).get("/api-keys/bootstrap")
    assert state["retired"] is True and state["retired_by"] == "bootstrap"
    assert client.get("/api/v1/groups", headers=bearer(ADMIN_KEY)).status_code == 401
    signed_in(client, ops["key"])
    page = client.get("/console/api-keys")
    assert "Retired at" in page.text and "by bootstrap" in page.text
    assert "Retire the bootstrap key</button>" not in page.text


@pytest.mark.parametrize("path", ["/console/api-keys/0/revoke", f"/console/api-keys/{2**64}/revoke"])
def test_an_impossible_key_id_is_refused_without_a_change(
    client: TestClient, admin: Admin, path: str
) -> None:
    ops = create(admin, "admin", "ops")
    csrf = signed_in(client, ADMIN_KEY)
    answer = client.post(path, data={"csrf_token": csrf})
    assert answer.status_code == 422 and answer.headers["content-type"].startswith("text/html")
    assert admin.get("/api-keys")[0]["id"] == ops["id"] and admin.get("/api-keys")[0]["revoked_at"] is None
