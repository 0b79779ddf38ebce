"""API keys on two replicas of one database (what two api processes are): a key made through one works
on the other at once, and a key revoked through one (or the bootstrap key retired) is refused by the
other within `cache_refresh_s`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from fabric_core.settings import Settings
from manager_db.counters import read_counters_outside
from tests.support.clients import ADMIN_KEY, Admin
from tests.support.waiting import wait_for

SCHEDULING_SLACK_S = 1.0
"""What a loaded test machine may add to a poll: the replica's loop thread, the refresh's own reads."""


@pytest.fixture
def replica(settings: Settings) -> Iterator[TestClient]:
    """A second manager on the same database."""
    with TestClient(create_app(settings)) as second:
        yield second


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def caught_up(client: TestClient, replica: TestClient, settings: Settings, what: str) -> float:
    """Wait until the replica's cache has seen the last change committed through `client`; how long
    that took from now (the change just committed)."""
    started = time.monotonic()
    _, generation = read_counters_outside(client.app.state.fabric.engine)  # type: ignore[attr-defined]
    view = replica.app.state.fabric.view  # type: ignore[attr-defined]
    wait_for(lambda: view.generation >= generation, timeout=10, what=what)
    elapsed = time.monotonic() - started
    assert elapsed <= settings.cache_refresh_s + SCHEDULING_SLACK_S, elapsed
    return elapsed


def test_a_key_made_through_one_replica_works_on_another_at_once(admin: Admin, replica: TestClient) -> None:
    made: dict[str, Any] = admin.post("/api-keys", {"role": "viewer", "name": "dashboard"})

    # no wait: the replica reads a key it does not know yet (one SELECT), then keeps it
    assert replica.get("/api/v1/groups", headers=bearer(made["key"])).status_code == 200


def test_a_key_revoked_through_one_replica_is_refused_by_another(
    client: TestClient, admin: Admin, replica: TestClient, settings: Settings
) -> None:
    made: dict[str, Any] = admin.post("/api-keys", {"role": "admin", "name": "ci"})
    caught_up(client, replica, settings, "the replica to load the new key")
    assert replica.get("/api/v1/groups", headers=bearer(made["key"])).status_code == 200
    keys = replica.app.state.fabric.keys  # type: ignore[attr-defined]
    assert keys.authenticate(made["key"], load=False) is not None  # served from the replica's memory

    admin.delete(f"/api-keys/{made['id']}")
    caught_up(client, replica, settings, "the replica to see the revocation")

    response = replica.get("/api/v1/groups", headers=bearer(made["key"]))
    assert response.status_code == 401
    assert response.json() == {"detail": "unknown or revoked API key"}
    changed = replica.post(
        "/api/v1/groups", json={"name": "x", "parent_id": admin.root()["id"]}, headers=bearer(made["key"])
    )
    assert changed.status_code == 401


@pytest.fixture
def frozen_replica(settings: Settings) -> Iterator[TestClient]:
    """A second manager on the same database that reloads nothing after its start (within the test):
    what it knows of a key made later, it can only have read on a miss."""
    with TestClient(create_app(settings.model_copy(update={"cache_refresh_s": 3600}))) as second:
        yield second


def test_a_key_the_other_replica_never_saw_is_refused_once_revoked(
    admin: Admin, frozen_replica: TestClient
) -> None:
    made: dict[str, Any] = admin.post("/api-keys", {"role": "admin"})
    admin.delete(f"/api-keys/{made['id']}")

    # no wait, no reload: the replica reads the row on a miss, and the row says revoked
    assert frozen_replica.get("/api/v1/groups", headers=bearer(made["key"])).status_code == 401


def test_the_bootstrap_key_retired_through_one_replica_is_refused_by_another(
    client: TestClient, admin: Admin, replica: TestClient, settings: Settings
) -> None:
    successor: dict[str, Any] = admin.post("/api-keys", {"role": "admin", "name": "successor"})
    assert replica.get("/api/v1/groups", headers=bearer(ADMIN_KEY)).status_code == 200

    admin.delete("/api-keys/bootstrap")
    caught_up(client, replica, settings, "the replica to see the retirement")

    response = replica.get("/api/v1/groups", headers=bearer(ADMIN_KEY))
    assert response.status_code == 401
    assert "retired" in response.json()["detail"]
    assert replica.get("/api/v1/groups", headers=bearer(successor["key"])).status_code == 200
