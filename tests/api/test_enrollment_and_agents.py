"""Enrolment tokens, enrolment, and the operator's view of agents: list, move, revoke."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

from sqlmodel import Session

from fabric_core.signing import VerifyKey, open_envelope
from manager_db.models import EnrollmentToken, utcnow
from tests.support.clients import AgentClient


def enrol(client: Any, token: str, hostname: str = "pc-1", facts: dict[str, Any] | None = None) -> Any:
    return client.post("/agent/v1/enroll", json={"token": token, "hostname": hostname, "facts": facts or {}})


def document_of(agent: AgentClient, envelope: Any) -> dict[str, Any]:
    key = agent.enrolment["signing_key"]
    return open_envelope(envelope, VerifyKey.from_base64(key["kid"], key["public_key"]))


def test_enrolment_returns_identity_group_and_signing_key(admin, client):
    root = admin.root()["id"]
    token = admin.post(f"/groups/{root}/enrollment-tokens", {})
    assert token["group_id"] == root
    assert token["token"]

    response = enrol(client, token["token"], hostname="pc-1", facts={"os": "linux"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["agent_id"] and body["secret"]
    assert body["group_id"] == root
    key = body["signing_key"]
    assert len(base64.b64decode(key["public_key"], validate=True)) == 32
    pinned = VerifyKey.from_base64(key["kid"], key["public_key"])  # the kid names that very key
    envelope = admin.get(f"/groups/{root}/locations/{admin.default_location(root)['id']}/effective")
    assert open_envelope(envelope, pinned)["group_id"] == root

    shown = admin.get(f"/agents/{body['agent_id']}")
    assert shown["hostname"] == "pc-1"
    assert shown["group_id"] == root
    assert (shown["serial"], shown["last_seen"], shown["online"], shown["revoked"]) == (0, None, False, False)


def test_each_enrolment_gets_its_own_identity(admin, client):
    token = admin.post(f"/groups/{admin.root()['id']}/enrollment-tokens", {})["token"]

    first, second = enrol(client, token).json(), enrol(client, token).json()

    assert first["agent_id"] != second["agent_id"]
    assert first["secret"] != second["secret"]


def test_expired_token_is_refused(admin, client):
    token = admin.post(f"/groups/{admin.root()['id']}/enrollment-tokens", {"expires_in_s": 60})
    with Session(client.app.state.fabric.engine) as session:
        row = session.get(EnrollmentToken, token["id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
        session.commit()

    response = enrol(client, token["token"])

    assert response.status_code == 401
    assert "expired" in response.json()["detail"]
    assert admin.get("/agents") == []


def test_token_with_max_uses_is_used_up(admin, client):
    token = admin.post(f"/groups/{admin.root()['id']}/enrollment-tokens", {"max_uses": 1})["token"]

    assert enrol(client, token).status_code == 200
    second = enrol(client, token, hostname="pc-2")

    assert second.status_code == 401
    assert second.json()["detail"]
    assert [a["hostname"] for a in admin.get("/agents")] == ["pc-1"]


def test_unknown_token_is_refused(admin, client):
    response = enrol(client, "pcet_no-such-token")

    assert response.status_code == 401
    assert response.json()["detail"]
    assert admin.get("/agents") == []


def test_tokens_for_unknown_groups_or_with_bad_lifetimes_are_refused(admin):
    root = admin.root()["id"]
    assert admin.post("/groups/999999/enrollment-tokens", {}, expect=404)["detail"]
    assert admin.post(f"/groups/{root}/enrollment-tokens", {"expires_in_s": 1}, expect=422)["detail"]
    assert admin.post(f"/groups/{root}/enrollment-tokens", {"max_uses": 0}, expect=422)["detail"]


def test_moved_agent_gets_the_new_groups_document(admin, enroll):
    root = admin.root()["id"]
    laptops = admin.group("Laptops", root, inherit=False)
    policy = admin.policy("Laptop firewall", "firewall", {"rules": ["deny all"]})
    admin.put(f"/groups/{laptops['id']}/policies/firewall", {"policy_id": policy["id"]})
    agent = enroll()
    first = agent.heartbeat(serial=0)
    old_location = document_of(agent, first["config"])["location_id"]

    moved = admin.patch(f"/agents/{agent.id}", {"group_id": laptops["id"]})
    assert moved["group_id"] == laptops["id"]

    # it still reports its old group's location: that falls back to its new group's Default
    reply = agent.heartbeat(serial=first["serial"], location_id=old_location)

    assert reply["changed"] is True
    assert reply["serial"] > first["serial"]
    doc = document_of(agent, reply["config"])
    assert doc["group_id"] == laptops["id"]
    assert doc["location_id"] == admin.default_location(laptops["id"])["id"]
    assert doc["policies"]["firewall"]["id"] == policy["id"]
    assert admin.get(f"/agents/{agent.id}")["group_id"] == laptops["id"]
    assert [a["id"] for a in admin.get("/agents", params={"group_id": laptops["id"]})] == [agent.id]


def test_moving_to_an_unknown_group_is_refused(admin, enroll):
    agent = enroll()

    assert admin.patch(f"/agents/{agent.id}", {"group_id": 999999}, expect=404)["detail"]
    assert admin.get(f"/agents/{agent.id}")["group_id"] == agent.group_id
    assert admin.patch("/agents/no-such-agent", {"group_id": agent.group_id}, expect=404)["detail"]


def test_revoked_agent_is_shut_out_at_once(admin, enroll):
    agent = enroll()
    serial = agent.heartbeat(serial=0)["serial"]  # now known to the heartbeat cache

    admin.delete(f"/agents/{agent.id}")

    refused = agent.heartbeat(serial=serial, expect=403)
    assert "revoked" in refused["detail"]
    config = agent.raw("GET", "/agent/v1/config")
    assert config.status_code == 403
    assert config.json()["detail"]
    shown = admin.get(f"/agents/{agent.id}")
    assert (shown["revoked"], shown["online"]) == (True, False)
    assert admin.delete(f"/agents/{agent.id}", expect=409)["detail"]


def test_revoked_agent_never_seen_by_the_cache_is_shut_out(admin, enroll):
    agent = enroll()
    admin.delete(f"/agents/{agent.id}")

    assert agent.heartbeat(expect=403)["detail"]


def test_unknown_or_missing_agent_secret_is_refused(client, enroll):
    enroll()
    for headers in ({}, {"Authorization": "Bearer pcas_unknown"}, {"Authorization": "Basic abc"}):
        response = client.post("/agent/v1/heartbeat", json={"serial": 0, "mode": "pull"}, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["detail"]
        assert client.get("/agent/v1/config", headers=headers).status_code == 401


def test_agents_list_pages_and_filters_by_group(admin, enroll):
    root = admin.root()["id"]
    branch = admin.group("Branch", root)
    in_root = [enroll(hostname=f"root-{n}").id for n in range(5)]
    in_branch = [enroll(group_id=branch["id"], hostname=f"branch-{n}").id for n in range(2)]

    everyone = [a["id"] for a in admin.get("/agents")]
    assert sorted(everyone) == sorted(in_root + in_branch)

    pages = [admin.get("/agents", params={"limit": 3, "offset": offset}) for offset in (0, 3, 6, 9)]
    assert [len(page) for page in pages] == [3, 3, 1, 0]
    assert [a["id"] for page in pages for a in page] == everyone  # stable order, nothing twice

    assert sorted(a["id"] for a in admin.get("/agents", params={"group_id": branch["id"]})) == sorted(
        in_branch
    )
    assert [a["id"] for a in admin.get("/agents", params={"group_id": root, "limit": 2, "offset": 4})] == [
        a["id"] for a in admin.get("/agents", params={"group_id": root})
    ][4:6]
    assert admin.get("/agents", params={"limit": 0}, expect=422)["detail"]
    assert admin.get("/agents", params={"offset": -1}, expect=422)["detail"]


def test_unknown_agent_is_404(admin):
    assert admin.get("/agents/no-such-agent", expect=404)["detail"]
    assert admin.delete("/agents/no-such-agent", expect=404)["detail"]
