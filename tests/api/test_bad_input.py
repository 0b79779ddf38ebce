"""Bad input gets a clear 4xx with a `detail` and changes nothing (DESIGN §6).

Every refusal below is checked against a snapshot of the whole state taken just before it: every row of
every table (groups, locations, policies, assignments, documents and their serials, the change counters,
the audit trail, the outbox, agents, tokens, keys and logs), the heartbeat cache and pending sightings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from fabric_core.settings import Settings
from tests.support.waiting import wait_for
from tests.support.world import World, build_world


@pytest.fixture
def world(client: TestClient) -> World:
    return build_world(client)


@pytest.fixture
def small_batches(settings: Settings) -> Iterator[World]:
    """A manager that takes at most three log entries per batch."""
    with TestClient(create_app(settings.model_copy(update={"max_log_entries": 3}))) as test_client:
        yield build_world(test_client)


HEARTBEAT = "/agent/v1/heartbeat"
JSON_HEADERS = {"Content-Type": "application/json"}


# --- malformed requests ------------------------------------------------------------------------------


def test_malformed_json_is_refused(world):
    broken = b'{"name": "x", "parent_id": '
    world.refused("POST", "/groups", 422, content=broken, headers=JSON_HEADERS)
    world.refused("PUT", f"/groups/{world.root}/communication", 422, content=b"hello", headers=JSON_HEADERS)
    world.refused(
        "POST", HEARTBEAT, 422, agent=True, content=b'{"serial": 0, "mode": "pull"', headers=JSON_HEADERS
    )
    world.refused("POST", "/agent/v1/enroll", 422, agent=True, content=b"[", headers=JSON_HEADERS)


def test_unknown_fields_are_refused_not_ignored(world):
    detail = world.refused("POST", "/groups", 422, json={"name": "x", "parent_id": world.root, "nmae": 2})
    assert "nmae" in json.dumps(detail)
    world.refused("PUT", f"/groups/{world.root}/communication", 422, json={"heartbeat": 60})
    world.refused("PATCH", f"/groups/{world.sales}", 422, json={"inherits": False})
    world.refused("POST", "/policies", 422, json={"name": "p", "type": "firewall", "body": {}, "scope": "x"})
    world.refused("PUT", f"/groups/{world.root}/policies/antivirus", 422, json={"policy": 1})
    world.refused("POST", HEARTBEAT, 422, agent=True, json={"serial": 0, "mode": "pull", "seriall": 3})


def test_wrong_types_are_refused(world):
    root = world.root
    for body in (
        {"name": "x", "parent_id": "root"},
        {"name": ["x"], "parent_id": root},
        {"name": "   ", "parent_id": root},
        {"parent_id": root},
    ):
        world.refused("POST", "/groups", 422, json=body)
    for body in ({"mode": "carrier-pigeon"}, {"download_enabled": "sometimes"}, {"heartbeat_s": "often"}):
        world.refused("PUT", f"/groups/{root}/communication", 422, json=body)
    for body in (
        {"name": "p", "type": "firewall", "body": [1, 2]},
        {"name": "p", "type": "Fire Wall", "body": {}},
        {"name": "p", "type": "firewall", "body": {"too big": 2**70}},  # no 64-bit integer
    ):
        world.refused("POST", "/policies", 422, json=body)
    world.refused("PUT", f"/policies/{world.firewall['id']}", 422, json={"body": {"too big": 2**70}})
    for body in (
        {"serial": "latest", "mode": "pull"},
        {"serial": -1, "mode": "pull"},
        {"serial": 0, "mode": "smoke"},
        {"serial": 0, "mode": "pull", "location_id": "office"},
        {"mode": "pull"},
    ):
        world.refused("POST", HEARTBEAT, 422, agent=True, json=body)
    world.refused("GET", "/agents", 422, params={"limit": "all"})


# --- too large ---------------------------------------------------------------------------------------


def test_oversize_body_is_413(world):
    limit = world.client.app.state.settings.max_body_bytes
    policy = {"name": "Huge", "type": "firewall", "body": {"blob": "x" * limit}}

    detail = world.refused("POST", "/policies", 413, json=policy)

    assert str(limit) in detail


def test_oversize_body_without_content_length_is_413(world):
    limit = world.client.app.state.settings.max_body_bytes
    payload = json.dumps({"name": "Huge", "type": "firewall", "body": {"blob": "x" * limit}}).encode()

    def chunks() -> Iterator[bytes]:  # streamed: no Content-Length to go by
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]

    world.refused("POST", "/policies", 413, content=chunks(), headers=JSON_HEADERS)


def test_oversize_log_batch_is_413_and_stores_nothing(world):
    limit = world.client.app.state.settings.max_body_bytes
    entries = [{"ts": "2024-05-01T08:00:00Z", "message": "x" * 4000} for _ in range(limit // 4000 + 1)]
    body = {"serial": 0, "mode": "pull", "logs": {"batch_id": "huge", "entries": entries}}
    assert len(json.dumps(body)) > limit

    world.refused("POST", HEARTBEAT, 413, agent=True, json=body)


def test_log_batch_over_max_log_entries_is_413_and_stores_nothing(small_batches):
    world = small_batches
    entry = {"ts": "2024-05-01T08:00:00Z", "message": "hello"}

    detail = world.refused(
        "POST",
        HEARTBEAT,
        413,
        agent=True,
        json={"serial": 0, "mode": "pull", "logs": {"batch_id": "b1", "entries": [entry] * 4}},
    )

    assert "3" in detail
    assert world.agent.heartbeat(serial=0, logs={"batch_id": "b1", "entries": [entry] * 3})["changed"]
    assert len(world.admin.get(f"/agents/{world.agent.id}/logs")) == 3


# --- requests that clash with the state --------------------------------------------------------------


def test_moving_a_group_under_its_own_descendant_is_409(world):
    assert "cycle" in world.refused(
        "PATCH", f"/groups/{world.engineering}", 409, json={"parent_id": world.build}
    )
    world.refused("PATCH", f"/groups/{world.engineering}", 409, json={"parent_id": world.engineering})


def test_deleting_a_group_with_children_or_agents_is_409(world):
    world.refused("DELETE", f"/groups/{world.engineering}", 409)
    world.refused("DELETE", f"/groups/{world.sales}", 409)


def test_the_root_cannot_be_deleted_moved_or_made_to_inherit(world):
    world.refused("DELETE", f"/groups/{world.root}", 409)
    world.refused("PATCH", f"/groups/{world.root}", 409, json={"inherit": True})
    world.refused("PATCH", f"/groups/{world.root}", 409, json={"parent_id": world.sales})


def test_assigning_a_policy_of_the_wrong_type_is_422(world):
    firewall = {"policy_id": world.firewall["id"]}
    world.refused("PUT", f"/groups/{world.root}/policies/antivirus", 422, json=firewall)
    world.refused(
        "PUT", f"/groups/{world.root}/locations/{world.office}/policies/antivirus", 422, json=firewall
    )
    world.refused("PUT", f"/groups/{world.root}/policies/antivirus", 422, json={"policy_id": 999999})


def test_changing_an_inheriting_group_is_409(world):
    antivirus = {"policy_id": world.antivirus["id"]}
    for group in (world.sales, world.build):
        world.refused("PUT", f"/groups/{group}/policies/antivirus", 409, json=antivirus)
        world.refused("DELETE", f"/groups/{group}/policies/firewall", 409)
        world.refused("POST", f"/groups/{group}/locations", 409, json={"name": "Home", "conditions": []})
        world.refused("PUT", f"/groups/{group}/communication", 409, json={"heartbeat_s": 60})
    world.refused(
        "PUT", f"/groups/{world.sales}/locations/{world.office}/policies/antivirus", 409, json=antivirus
    )
    world.refused("DELETE", f"/groups/{world.sales}/locations/{world.office}", 409)


def test_deleting_the_default_location_is_409(world):
    world.refused("DELETE", f"/groups/{world.root}/locations/{world.default}", 409)


def test_deleting_a_policy_in_use_is_409(world):
    world.refused("DELETE", f"/policies/{world.firewall['id']}", 409)


def test_duplicate_names_are_409(world):
    world.refused("POST", "/groups", 409, json={"name": "Sales", "parent_id": world.root})
    world.refused("POST", "/groups", 409, json={"name": "sales", "parent_id": world.root})
    world.refused("PATCH", f"/groups/{world.engineering}", 409, json={"name": "Sales"})
    world.refused("POST", f"/groups/{world.root}/locations", 409, json={"name": "Office", "conditions": []})
    world.refused("PATCH", f"/groups/{world.root}/locations/{world.office}", 409, json={"name": "Default"})
    world.refused("POST", "/policies", 409, json={"name": "Antivirus", "type": "antivirus", "body": {}})


def test_a_group_can_share_a_name_with_a_group_elsewhere_in_the_tree(world):
    world.admin.group("Build", world.root)  # "Build" exists, but under Engineering: allowed


# --- invalid values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "condition",
    [
        {"type": "ip_range", "cidr": "nope"},
        {"type": "dns_server", "address": "dns.example.com"},
        {"type": "network_type", "value": "carrier-pigeon"},
        {"type": "fact", "name": "os"},
        {"type": "fact", "name": "os", "matches": "("},
        {"type": "ip_range", "cidr": "10.0.0.0/8", "weight": 0},
        {"type": "moon_phase"},
    ],
    ids=["cidr", "dns", "network", "fact-no-test", "fact-bad-regex", "weight", "unknown-type"],
)
def test_invalid_location_conditions_are_422(world, condition):
    world.refused(
        "POST", f"/groups/{world.root}/locations", 422, json={"name": "Home", "conditions": [condition]}
    )
    world.refused(
        "PATCH", f"/groups/{world.root}/locations/{world.office}", 422, json={"conditions": [condition]}
    )


@pytest.mark.parametrize("heartbeat_s", [0, -5, 100_000])
def test_heartbeat_interval_out_of_range_is_422(world, heartbeat_s):
    world.refused("PUT", f"/groups/{world.root}/communication", 422, json={"heartbeat_s": heartbeat_s})
    world.refused(
        "PUT",
        f"/groups/{world.root}/locations/{world.office}/communication",
        422,
        json={"use_group_settings": False, "heartbeat_s": heartbeat_s},
    )


def test_references_to_nothing_in_a_body_are_422(world):
    world.refused("POST", "/groups", 422, json={"name": "Orphan", "parent_id": 999999})
    world.refused("PATCH", f"/groups/{world.sales}", 422, json={"parent_id": 999999})


# --- values a database or canonical JSON cannot hold ------------------------------------------------


def raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": JSON_HEADERS}


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", str(2**70)])
def test_numbers_plain_json_cannot_carry_are_refused(world, number):
    """Python's JSON parser takes NaN and Infinity; canonical JSON and PostgreSQL's json do not."""
    token = world.admin.post(f"/groups/{world.sales}/enrollment-tokens", {})["token"]
    entry = f'{{"ts": "2024-05-01T08:00:00Z", "message": "m", "data": {{"x": {number}}}}}'

    world.refused(
        "POST",
        "/policies",
        422,
        **raw_json(f'{{"name": "p", "type": "firewall", "body": {{"x": {number}}}}}'),
    )
    world.refused(
        "PUT", f"/policies/{world.firewall['id']}", 422, **raw_json(f'{{"body": {{"x": [{number}]}}}}')
    )
    world.refused(
        "POST",
        HEARTBEAT,
        422,
        agent=True,
        **raw_json(f'{{"serial": 0, "mode": "pull", "status": {{"load": {number}}}}}'),
    )
    world.refused(
        "POST",
        HEARTBEAT,
        422,
        agent=True,
        **raw_json(f'{{"serial": 0, "mode": "pull", "logs": {{"batch_id": "b", "entries": [{entry}]}}}}'),
    )
    world.refused(
        "POST",
        "/agent/v1/enroll",
        422,
        agent=True,
        **raw_json(f'{{"token": "{token}", "hostname": "h", "facts": {{"x": {number}}}}}'),
    )


def test_text_with_nul_characters_is_refused(world):
    """PostgreSQL text cannot hold NUL: refused with a reason on every backend, not a 500 on one."""
    token = world.admin.post(f"/groups/{world.sales}/enrollment-tokens", {})["token"]
    nul = "a\u0000b"

    world.refused("POST", "/groups", 422, json={"name": nul, "parent_id": world.root})
    world.refused("PATCH", f"/groups/{world.sales}", 422, json={"name": nul})
    world.refused("POST", "/policies", 422, json={"name": nul, "type": "firewall", "body": {}})
    world.refused("PUT", f"/policies/{world.firewall['id']}", 422, json={"name": nul, "body": {}})
    world.refused("POST", f"/groups/{world.root}/locations", 422, json={"name": nul, "conditions": []})
    world.refused("PATCH", f"/groups/{world.root}/locations/{world.office}", 422, json={"name": nul})
    world.refused(
        "POST", "/agent/v1/enroll", 422, agent=True, json={"token": token, "hostname": nul, "facts": {}}
    )
    for field in ("message", "category"):
        entry = {"ts": "2024-05-01T08:00:00Z", "message": "m", field: nul}
        body = {"serial": 0, "mode": "pull", "logs": {"batch_id": "b", "entries": [entry]}}
        world.refused("POST", HEARTBEAT, 422, agent=True, json=body)
    world.refused("GET", "/agents/a%00b", 404)
    world.refused("GET", "/agents/a%00b/logs", 404)


def test_a_serial_beyond_64_bits_is_refused_and_bookkeeping_goes_on(world):
    world.refused("POST", HEARTBEAT, 422, agent=True, json={"serial": 2**63, "mode": "pull"})

    world.agent.heartbeat(serial=3)
    wait_for(
        lambda: world.admin.agent(world.agent.id)["serial"] == 3,
        timeout=5,
        what="the heartbeat bookkeeping to record serial 3 (stalled?)",
    )


# --- ids that name nothing ---------------------------------------------------------------------------


def test_nonexistent_ids_are_404(world):
    root, missing = world.root, 999999
    for method, path, body in (
        ("GET", f"/groups/{missing}", None),
        ("PATCH", f"/groups/{missing}", {"name": "x"}),
        ("DELETE", f"/groups/{missing}", None),
        ("GET", f"/groups/{missing}/locations", None),
        ("POST", f"/groups/{missing}/locations", {"name": "x", "conditions": []}),
        ("GET", f"/groups/{missing}/communication", None),
        ("PUT", f"/groups/{missing}/communication", {"heartbeat_s": 60}),
        ("GET", f"/groups/{root}/locations/{missing}", None),
        ("PATCH", f"/groups/{root}/locations/{missing}", {"name": "x"}),
        ("DELETE", f"/groups/{root}/locations/{missing}", None),
        ("GET", f"/groups/{root}/locations/{missing}/effective", None),
        ("GET", f"/groups/{root}/locations/{missing}/communication", None),
        ("GET", f"/groups/{root}/locations/{world.engineering_office}", None),  # another group's location
        ("DELETE", f"/groups/{root}/locations/{world.engineering_office}", None),
        ("GET", f"/policies/{missing}", None),
        ("PUT", f"/policies/{missing}", {"body": {}}),
        ("DELETE", f"/policies/{missing}", None),
        ("PUT", f"/groups/{missing}/policies/firewall", {"policy_id": world.firewall["id"]}),
        ("DELETE", f"/groups/{root}/policies/antivirus", None),  # nothing of that type is assigned
        ("PUT", f"/groups/{root}/locations/{missing}/policies/firewall", {"policy_id": world.firewall["id"]}),
        ("POST", f"/groups/{missing}/enrollment-tokens", {}),
        ("GET", "/agents/nobody", None),
        ("PATCH", "/agents/nobody", {"group_id": root}),
        ("DELETE", "/agents/nobody", None),
        ("POST", "/agents/nobody/update-now", None),
    ):
        world.refused(method, path, 404, json=body)


def test_unknown_paths_are_404_with_a_detail(world):
    world.refused("GET", "/nothing-here", 404)
    world.refused("GET", "/agent/v1/nothing-here", 404, agent=True)


def test_the_world_still_works_after_all_that(world):
    """The refusals above leave a manager that accepts good requests (the fixture is not broken)."""
    world.admin.patch(f"/groups/{world.build}", {"parent_id": world.root})
    world.admin.delete(f"/groups/{world.build}")
    assert world.agent.heartbeat(serial=0)["changed"] is True
