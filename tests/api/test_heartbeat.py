"""The heartbeat (DESIGN §5 agent API, §6 hot path): signed documents, serials, ETags and bookkeeping."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlmodel import Session

from api.heartbeat import fast_path
from api.main import create_app
from fabric_core.errors import BadSignature
from fabric_core.settings import Settings
from fabric_core.signing import VerifyKey, open_envelope
from manager_db.models import Agent
from tests.support.clients import Admin, AgentClient
from tests.support.waiting import wait_for


def pinned_key(agent: AgentClient) -> VerifyKey:
    key = agent.enrolment["signing_key"]
    return VerifyKey.from_base64(key["kid"], key["public_key"])


def document_of(agent: AgentClient, envelope: Any) -> dict[str, Any]:
    """The document of an envelope, verified with the key the agent pinned at enrolment."""
    return open_envelope(envelope, pinned_key(agent))


def assign_firewall(admin: Admin, group_id: int, name: str = "Firewall") -> dict[str, Any]:
    policy = admin.policy(name, "firewall", {"rules": [{"allow": "tcp/443"}]})
    admin.put(f"/groups/{group_id}/policies/firewall", {"policy_id": policy["id"]})
    return policy


# --- the document and its serial ---------------------------------------------------------------------


def test_first_heartbeat_delivers_the_signed_document(admin, enroll):
    agent = enroll()
    reply = agent.heartbeat(serial=0)

    assert reply["changed"] is True
    doc = document_of(agent, reply["config"])
    assert doc["serial"] == reply["serial"]
    assert doc["group_id"] == agent.group_id
    assert doc["location_id"] == admin.default_location(agent.group_id)["id"]
    assert doc == admin.effective(agent.group_id)  # exactly what the operator sees


def test_a_tampered_document_does_not_verify(enroll):
    agent = enroll()
    envelope = agent.heartbeat(serial=0)["config"]
    envelope["doc"]["communication"]["heartbeat_s"] = 1

    with pytest.raises(BadSignature):
        document_of(agent, envelope)


def test_heartbeat_with_the_current_serial_is_unchanged(enroll):
    agent = enroll()
    serial = agent.heartbeat(serial=0)["serial"]

    reply = agent.heartbeat(serial=serial)

    assert reply == {"changed": False, "serial": serial, "next_heartbeat_s": reply["next_heartbeat_s"]}
    assert "config" not in reply


def test_next_heartbeat_is_jittered_around_the_group_interval(admin, enroll, client):
    root = admin.root()["id"]
    admin.put(f"/groups/{root}/communication", {"heartbeat_s": 1000})
    agent = enroll()
    serial = agent.heartbeat(serial=0)["serial"]
    jitter = client.app.state.settings.heartbeat_jitter
    assert jitter > 0

    intervals = [agent.heartbeat(serial=serial)["next_heartbeat_s"] for _ in range(40)]

    assert all(1000 * (1 - jitter) <= n <= 1000 * (1 + jitter) for n in intervals), intervals
    assert len(set(intervals)) > 1, "every agent would heartbeat in step"


def test_a_policy_change_reaches_the_next_heartbeat(admin, enroll):
    agent = enroll()
    first = agent.heartbeat(serial=0)["serial"]

    policy = assign_firewall(admin, agent.group_id)
    reply = agent.heartbeat(serial=first)

    assert reply["changed"] is True
    assert reply["serial"] > first
    doc = document_of(agent, reply["config"])
    assert doc["serial"] == reply["serial"]
    assert doc["policies"]["firewall"]["id"] == policy["id"]
    assert agent.heartbeat(serial=reply["serial"])["changed"] is False

    admin.put(f"/policies/{policy['id']}", {"body": {"rules": []}})  # editing the shared policy
    edited = agent.heartbeat(serial=reply["serial"])

    assert edited["changed"] is True
    assert edited["serial"] > reply["serial"]
    assert document_of(agent, edited["config"])["policies"]["firewall"]["version"] == 2


def test_unknown_location_falls_back_to_the_default_document(admin, enroll):
    root = admin.root()["id"]
    office = admin.post(
        f"/groups/{root}/locations",
        {"name": "Office", "conditions": [{"type": "ip_range", "cidr": "10.0.0.0/8"}]},
    )
    default = admin.default_location(root)
    own = admin.group("Own", root, inherit=False)  # a group with locations of its own
    foreign = next(loc for loc in admin.get(f"/groups/{own['id']}/locations") if loc["name"] == "Office")
    agent = enroll()

    at_office = document_of(agent, agent.heartbeat(serial=0, location_id=office["id"])["config"])
    assert at_office["location_id"] == office["id"]

    for location_id in (999_999, foreign["id"]):
        reply = agent.heartbeat(serial=0, location_id=location_id)
        doc = document_of(agent, reply["config"])
        assert doc["location_id"] == default["id"]
        assert doc == admin.effective(root, default["id"])


# --- GET /agent/v1/config with ETags -----------------------------------------------------------------


def test_config_fetch_answers_304_while_current(admin, enroll):
    agent = enroll()
    current = agent.raw("GET", "/agent/v1/config")
    assert current.status_code == 200
    etag = current.headers["etag"]
    doc = document_of(agent, current.content)
    assert doc["serial"] == agent.heartbeat(serial=0)["serial"]

    unchanged = agent.raw("GET", "/agent/v1/config", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""

    assign_firewall(admin, agent.group_id)
    changed = agent.raw("GET", "/agent/v1/config", headers={"If-None-Match": etag})

    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert document_of(agent, changed.content)["serial"] > doc["serial"]


def test_config_fetch_of_an_unknown_location_is_the_default_document(admin, enroll):
    agent = enroll()
    default = admin.default_location(agent.group_id)

    response = agent.raw("GET", "/agent/v1/config", params={"location_id": 999_999})

    assert response.status_code == 200
    assert document_of(agent, response.content) == admin.effective(agent.group_id, default["id"])


# --- bookkeeping -------------------------------------------------------------------------------------


def test_heartbeat_bookkeeping_shows_in_the_agent_view(admin, enroll):
    root = admin.root()["id"]
    office = admin.post(f"/groups/{root}/locations", {"name": "Office", "conditions": []})
    agent = enroll()
    never_seen = admin.get(f"/agents/{agent.id}")
    assert (never_seen["last_seen"], never_seen["online"], never_seen["serial"]) == (None, False, 0)

    serial = agent.heartbeat(serial=0, location_id=office["id"], mode="push")["serial"]
    agent.heartbeat(serial=serial, location_id=office["id"], mode="push")

    seen = wait_for(
        lambda: admin.agent(agent.id), until=lambda a: a["serial"] == serial, timeout=5, what="the sighting"
    )
    assert seen["last_seen"] is not None
    assert seen["online"] is True
    assert seen["mode"] == "push"
    assert seen["location_id"] == office["id"]
    assert seen["current_serial"] == serial
    assert seen["up_to_date"] is True

    assign_firewall(admin, root)
    stale = admin.get(f"/agents/{agent.id}")
    assert stale["current_serial"] > serial
    assert stale["up_to_date"] is False

    newer = agent.heartbeat(serial=serial, location_id=office["id"], mode="push")["serial"]
    agent.heartbeat(serial=newer, location_id=office["id"], mode="push")
    caught_up = wait_for(
        lambda: admin.agent(agent.id), until=lambda a: a["serial"] == newer, timeout=5, what="the new serial"
    )
    assert caught_up["up_to_date"] is True
    assert caught_up["current_serial"] == newer


@pytest.fixture
def quiet_client(settings: Settings) -> Iterator[TestClient]:
    """A manager whose heartbeat bookkeeping is flushed only when the test says so."""
    with TestClient(create_app(settings.model_copy(update={"heartbeat_flush_s": 3600.0}))) as test_client:
        yield test_client


def _statements(engine: Any, work: Callable[[], None]) -> list[str]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        work()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return seen


def _writes(statements: list[str]) -> list[str]:
    return [s for s in statements if s.lstrip().split(None, 1)[0].upper() in {"INSERT", "UPDATE", "DELETE"}]


def test_heartbeats_do_no_per_request_database_write(quiet_client):
    admin = Admin(quiet_client)
    agent = admin.enroll(hostname="h")
    fabric = quiet_client.app.state.fabric
    serial = agent.heartbeat(serial=0)["serial"]
    fabric.view.refresh()  # take in the enrolment now, not while counting
    fabric.ledger.flush(fabric.engine)

    def heartbeats() -> None:
        for _ in range(50):
            assert agent.heartbeat(serial=serial)["changed"] is False

    during = _statements(fabric.engine, heartbeats)

    assert _writes(during) == []
    # served from memory: the only statements are the cache's poll of the change counter
    assert [s for s in during if "fabric_counters" not in s] == []
    assert len(fabric.ledger) == 1  # the sighting waits in memory for the batched write

    flushed = _statements(fabric.engine, lambda: fabric.ledger.flush(fabric.engine))

    assert [s.split()[0:2] for s in _writes(flushed)] == [["UPDATE", "agents"]]
    assert admin.get(f"/agents/{agent.id}")["serial"] == serial


# --- update now --------------------------------------------------------------------------------------


def test_update_now_resends_the_current_document_once(admin, enroll, client):
    agent = enroll()
    serial = agent.heartbeat(serial=0)["serial"]
    assert agent.heartbeat(serial=serial)["changed"] is False

    assert admin.post(f"/agents/{agent.id}/update-now", {}, expect=202)["status"] == "requested"
    forced = agent.heartbeat(serial=serial)

    assert forced["changed"] is True
    assert forced["serial"] == serial
    assert document_of(agent, forced["config"])["serial"] == serial
    assert agent.heartbeat(serial=serial)["changed"] is False

    def requested() -> bool:
        with Session(client.app.state.fabric.engine) as session:
            row = session.get(Agent, agent.id)
            assert row is not None
            return row.update_requested

    # served: the request is cleared in the database too
    wait_for(
        requested, until=lambda flag: flag is False, timeout=5, what="the request cleared in the database"
    )


def test_update_now_before_the_first_heartbeat_is_served(admin, enroll):
    agent = enroll()
    admin.post(f"/agents/{agent.id}/update-now", {}, expect=202)

    serial = agent.heartbeat(serial=0)["serial"]

    assert agent.heartbeat(serial=serial)["changed"] is False


def test_update_now_of_unknown_or_revoked_agents_is_refused(admin, enroll):
    agent = enroll()
    admin.post("/agents/no-such-agent/update-now", {}, expect=404)
    admin.delete(f"/agents/{agent.id}")
    admin.post(f"/agents/{agent.id}/update-now", {}, expect=409)


# --- status: sent when it changed, kept when absent --------------------------------------------------


@pytest.fixture(params=["fast path", "route"])
def door(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, answered_fast: list[bytes]
) -> tuple[str, list[bytes]]:
    """Which door serves the everyday heartbeat: the fast path, or the FastAPI route (fast path off).
    Returns the door and the bodies the fast path answered."""
    if request.param == "route":
        monkeypatch.setattr(fast_path, "FAST_BODY_LIMIT", 0)
    return request.param, answered_fast


def stored_status(client: TestClient, agent: AgentClient) -> Any:
    """The agent's status in the database, once what the ledger holds is written."""
    fabric = client.app.state.fabric
    fabric.ledger.flush(fabric.engine)
    with Session(fabric.engine) as session:
        row = session.get(Agent, agent.id)
        assert row is not None
        return row.status


def test_a_heartbeat_without_status_keeps_the_stored_status(client, enroll, door):
    path, answered = door
    agent = enroll()
    serial = agent.heartbeat(serial=0)["serial"]  # the agent's first heartbeat ever, without status
    assert stored_status(client, agent) == {}

    status = {"hostname": "pc-1", "agent_version": "1.2.3", "content": {"definitions": 4}}
    assert agent.heartbeat(serial=serial, status=status)["changed"] is False
    assert stored_status(client, agent) == status
    agent.heartbeat(serial=serial)  # absent: unchanged
    assert stored_status(client, agent) == status
    agent.heartbeat(serial=serial, status=None)  # null: the same
    assert stored_status(client, agent) == status

    # Within one flush window, a heartbeat without status does not undo an earlier one's.
    newer = {**status, "content": {"definitions": 5}}
    agent.heartbeat(serial=serial, status=newer)
    agent.heartbeat(serial=serial, location_id=999_999)
    assert stored_status(client, agent) == newer

    # A log upload (always the route) without status keeps it too.
    agent.heartbeat(serial=serial, logs={"batch_id": "b-1", "entries": []})
    assert stored_status(client, agent) == newer

    agent.heartbeat(serial=serial, status={})  # an empty object is a status: it replaces
    assert stored_status(client, agent) == {}
    # all but the first (an agent not cached yet) and the log upload
    assert len(answered) == (6 if path == "fast path" else 0)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"serial": 1, "mode": "pull", "status": "ok"}', "status"),
        (b'{"serial": 1, "mode": "pull", "status": [1]}', "status"),
        (b'{"serial": 1, "mode": "pull", "status": {"big": 1180591620717411303424}}', "status must be"),
        # refused before the model: a body must be JSON as orjson reads it (api.json_body)
        (b'{"serial": 1, "mode": "pull", "status": {"x": NaN}}', "NaN and Infinity are not JSON"),
    ],
    ids=["string", "list", "big integer", "NaN"],
)
def test_a_malformed_status_is_refused_and_changes_nothing(client, enroll, door, body, words):
    agent = enroll()
    status = {"hostname": "pc-1"}
    agent.heartbeat(serial=0, status=status)
    assert stored_status(client, agent) == status
    headers = {**agent.headers, "Content-Type": "application/json"}

    response = client.post("/agent/v1/heartbeat", content=body, headers=headers)

    assert response.status_code == 422, response.text
    assert words in response.text
    assert stored_status(client, agent) == status
    assert door[1] == []  # never the fast path's to answer
