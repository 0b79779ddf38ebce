"""The other side of tests/api/test_hostile_input.py: what the input rules still accept, and how.

A policy body at the depth limit is accepted and assignable; a status at the limit takes the fast path;
plain relative content paths are published; log timestamps parse from ISO strings; a pattern that
backtracks in Python is accepted (RE2 runs it in linear time); names are NFC before the uniqueness check.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from fabric_core.canonical import MAX_JSON_DEPTH
from tests.support.world import Id, World, build_world, expand, nested

HEARTBEAT = "/agent/v1/heartbeat"
DECOMPOSED, COMPOSED = "Cafe\u0301", "Caf\u00e9"


@pytest.fixture
def world(client: TestClient) -> World:
    return build_world(client)


def test_a_policy_body_at_the_depth_limit_is_accepted_and_assignable(world):
    policy = world.admin.policy("Deep", "deep", nested(MAX_JSON_DEPTH))
    world.admin.assign(world.engineering, policy)
    assert world.admin.effective(world.engineering)["policies"]["deep"]["body"] == nested(MAX_JSON_DEPTH)
    world.admin.put(f"/policies/{policy['id']}", {"body": nested(MAX_JSON_DEPTH)})


def test_a_status_at_and_beyond_the_limit_gets_the_same_answer_from_both_doors(world, answered_fast):
    """The fast path refuses a status one level too deep, as the route does (it hands it over)."""
    world.agent.heartbeat(serial=0)
    at_limit = world.agent.heartbeat(serial=0, status=nested(MAX_JSON_DEPTH))
    assert at_limit["changed"] is True
    assert len(answered_fast) == 1
    fabric = world.client.app.state.fabric
    fabric.ledger.flush(fabric.engine)  # what the heartbeats left pending: the snapshot must hold still
    world.refused(
        "POST", HEARTBEAT, 422, agent=True, json={"serial": 0, "mode": "pull", "status": nested(33)}
    )
    assert len(answered_fast) == 1


def test_plain_relative_paths_are_published(world):
    digest = world.admin.upload(b"one")
    paths = ["a", "b/c.db", "d/e/f", "dots...", ".hidden", "sp ace/ü"]
    revision = world.admin.post(
        "/content/definitions/revisions", {"files": [{"path": p, "sha256": digest} for p in paths]}
    )
    assert [f["path"] for f in revision["files"]] == sorted(paths)


def test_log_entries_still_take_iso_timestamps(world):
    entries = [
        {"ts": "2024-05-01T08:00:00Z", "message": "utc"},
        {"ts": "2024-05-01T10:00:00+02:00", "message": "offset"},
        {"ts": "2024-05-01T08:00:00", "message": "naive"},
    ]
    world.agent.heartbeat(serial=0, logs={"batch_id": "iso", "entries": entries})
    stored = world.admin.get(f"/agents/{world.agent.id}/logs", params={"since": "2024-05-01T07:00:00+00:00"})
    assert {e["message"] for e in stored} == {"utc", "offset", "naive"}
    assert {e["ts"] for e in stored} == {"2024-05-01T08:00:00Z"}


def test_a_pattern_that_backtracks_in_python_is_accepted_and_runs_in_linear_time(world):
    condition = {"type": "fact", "name": "hostname", "matches": "(a+)+$"}
    world.admin.post(f"/groups/{world.root}/locations", {"name": "Lab", "conditions": [condition]})

    from fabric_core.patterns import fullmatch

    started = time.perf_counter()
    assert not fullmatch("(a+)+$", "a" * 100_000 + "b")
    assert time.perf_counter() - started < 0.5  # Python's re needed seconds at 26 characters


@pytest.mark.parametrize(
    ("create", "again"),
    [
        (
            ("POST", "/groups", {"name": DECOMPOSED, "parent_id": Id("root")}),
            ("POST", "/groups", {"name": COMPOSED, "parent_id": Id("root")}),
        ),
        (
            ("POST", "/groups/<root>/locations", {"name": DECOMPOSED}),
            ("POST", "/groups/<root>/locations", {"name": COMPOSED}),
        ),
        (
            ("POST", "/policies", {"name": DECOMPOSED, "type": "x", "body": {}}),
            ("POST", "/policies", {"name": COMPOSED, "type": "x", "body": {}}),
        ),
    ],
    ids=["group", "location", "policy"],
)
def test_names_are_nfc_before_the_uniqueness_check(world, create, again):
    method, path, body = create
    made = world.admin.call(method, expand(world, path), 201, json=expand(world, body))
    assert made["name"] == COMPOSED
    method, path, body = again
    world.refused(method, expand(world, path), 409, json=expand(world, body))


def test_hostnames_are_nfc_at_enrolment(world):
    agent = world.admin.enroll(world.sales, hostname=DECOMPOSED)
    assert world.admin.agent(agent.id)["hostname"] == COMPOSED
