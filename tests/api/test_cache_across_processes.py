"""The heartbeat cache of one manager process follows changes made through another (same database)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from fabric_core.settings import Settings
from tests.support.clients import Admin, AgentClient
from tests.support.waiting import wait_for


@pytest.fixture
def replica(settings: Settings) -> Iterator[TestClient]:
    """A second manager on the same database: what another uvicorn worker or api replica is."""
    with TestClient(create_app(settings)) as second:
        yield second


def test_a_change_made_through_one_replica_reaches_heartbeats_on_another(
    admin: Admin, replica: TestClient, enroll: Callable[..., AgentClient]
) -> None:
    agent = enroll()
    on_replica = AgentClient(replica, agent.enrolment)
    first = on_replica.heartbeat()
    serial = first["serial"]
    assert on_replica.heartbeat(serial=serial)["changed"] is False

    root = admin.root()
    policy = admin.policy("fw", "firewall", {"default": "deny"})
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": policy["id"]})
    new_serial = admin.effective(root["id"])["serial"]

    answer = wait_for(
        lambda: on_replica.heartbeat(serial=serial),
        until=lambda r: r["changed"],
        timeout=5,
        what="the replica to see the new document",
    )
    assert answer["serial"] == new_serial
    assert answer["config"]["doc"]["policies"]["firewall"]["body"] == {"default": "deny"}


def test_revoking_through_one_replica_locks_the_agent_out_of_another(
    admin: Admin, replica: TestClient, enroll: Callable[..., AgentClient]
) -> None:
    agent = enroll()
    on_replica = AgentClient(replica, agent.enrolment)
    on_replica.heartbeat()  # now cached by the replica

    admin.delete(f"/agents/{agent.id}")

    wait_for(
        lambda: (
            on_replica.raw("POST", "/agent/v1/heartbeat", json={"serial": 0, "mode": "pull"}).status_code
            == 403
        ),
        timeout=5,
        what="the replica to refuse the revoked agent",
    )


def test_moving_an_agent_through_one_replica_changes_its_document_on_another(
    admin: Admin, replica: TestClient, enroll: Callable[..., AgentClient]
) -> None:
    agent = enroll()
    on_replica = AgentClient(replica, agent.enrolment)
    serial = on_replica.heartbeat()["serial"]
    servers = admin.group("Servers", admin.root()["id"], inherit=False)

    admin.patch(f"/agents/{agent.id}", {"group_id": servers["id"]})

    answer = wait_for(
        lambda: on_replica.heartbeat(serial=serial),
        until=lambda r: r["changed"],
        timeout=5,
        what="the replica to serve the new group's document",
    )
    assert answer["config"]["doc"]["group_id"] == servers["id"]
