"""The heartbeat's fast path (`HeartbeatFastPath`) answers exactly as the FastAPI route does.

Every body below is sent twice to the same manager: once as it is, once with the fast path switched off
(everything then goes through the route). Status, headers and body must match (`next_heartbeat_s` is
jittered, so it is compared by range); the everyday requests must have been answered by the fast path,
the others handed to the route.
"""

from __future__ import annotations

import json
from typing import Any

from api.heartbeat import fast_path
from tests.support.clients import AgentClient

JSON = {"Content-Type": "application/json"}


def _send(agent: AgentClient, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    response = agent.client.post(fast_path.HEARTBEAT_PATH, content=body, headers=headers)
    kept = {k: v for k, v in response.headers.items() if k in ("content-type", "content-length")}
    reply = response.json()
    if response.status_code == 200:
        interval = reply.pop("next_heartbeat_s")
        assert 1 <= interval <= 86_400 * 2
        kept.pop("content-length")  # the interval's digits may differ
    return response.status_code, kept, reply


def test_fast_path_and_route_answer_alike(enroll, admin, monkeypatch, answered_fast):
    agent = enroll()
    serial = agent.heartbeat(serial=0)["serial"]
    default = admin.default_location(agent.group_id)["id"]
    status = {"hostname": "pc-1", "agent_version": "1.0", "disks": [{"free": 10, "ok": True, "n": None}]}
    everyday = [
        {"serial": serial, "mode": "pull"},
        {"serial": serial, "location_id": default, "mode": "push", "status": status},
        {"serial": serial, "location_id": None, "mode": "pull", "status": {}, "logs": None},
        {"serial": serial, "location_id": 999_999, "mode": "pull"},  # unknown: the Default's document
        {"serial": 0, "mode": "pull"},  # behind: the signed document comes back
        {"serial": serial + 1000, "mode": "pull"},
        {"serial": serial, "mode": "pull", "status": None},  # null: unchanged, as if absent
    ]
    others: list[Any] = [
        {"serial": serial, "mode": "pull", "status": {"load": 0.5}},  # floats go to the route
        {"serial": serial, "mode": "pull", "status": {"big": 2**70}},
        {"serial": 2**63, "mode": "pull"},
        {"serial": 2**64 + 1, "mode": "pull"},
        {"serial": -1, "mode": "pull"},
        {"serial": "5", "mode": "pull"},
        {"serial": 5.0, "mode": "pull"},
        {"serial": True, "mode": "pull"},
        {"serial": serial, "mode": "smoke"},
        {"serial": serial, "mode": "pull", "seriall": 1},
        {"serial": serial, "mode": "pull", "status": []},
        {"serial": serial, "mode": "pull", "status": "ok"},
        {"serial": serial, "location_id": "office", "mode": "pull"},
        {"mode": "pull"},
        [],
        {"serial": serial, "mode": "pull", "logs": {"batch_id": "b1", "entries": []}},
        {"serial": serial, "mode": "pull", "logs": {"batch_id": "b2", "entries": [{"message": "x"}]}},
    ]
    raw = [
        b'{"serial": 0, "mode": "pull"',
        b'{"serial": 0, "mode": "pull", "status": {"x": NaN}}',
        b'{"serial": 0, "mode": "pull", "status": {"x": 1e400}}',
        b'{"serial": 0, "mode": "pull", "status": {"s": "\\ud800"}}',
    ]
    cases = [(json.dumps(b).encode(), agent.headers | JSON) for b in everyday + others] + [
        (b, agent.headers | JSON) for b in raw
    ]
    plain = json.dumps(everyday[0]).encode()
    cases += [
        (plain, {**agent.headers, "Content-Type": "text/plain"}),
        (plain, {**agent.headers, "Content-Type": "application/json; charset=utf-8"}),
        (plain, JSON),
        (plain, {"Authorization": "Bearer nobody", **JSON}),
        (plain, {"Authorization": "Basic abc", **JSON}),
    ]

    fast = [_send(agent, body, headers) for body, headers in cases]
    answered = list(answered_fast)
    monkeypatch.setattr(fast_path, "FAST_BODY_LIMIT", 0)
    routed = [_send(agent, body, headers) for body, headers in cases]

    for (body, headers), one, other in zip(cases, fast, routed, strict=True):
        assert one == other, (body, headers)
    everyday_bodies = [json.dumps(b).encode() for b in everyday]
    assert answered[: len(everyday)] == everyday_bodies
    assert answered[len(everyday) :] == [plain], "only the charset variant of the others is everyday"
    assert [s for s, _, _ in fast[len(everyday) : len(everyday) + 2]] == [200, 422]


def test_fast_path_leaves_revoked_agents_and_update_now_to_the_route(enroll, admin, answered_fast):
    agent = enroll()
    serial = agent.heartbeat(serial=0)["serial"]
    assert agent.heartbeat(serial=serial)["changed"] is False
    assert len(answered_fast) == 1

    admin.post(f"/agents/{agent.id}/update-now", {}, expect=202)
    assert agent.heartbeat(serial=serial)["changed"] is True  # the route serves the update, once
    assert agent.heartbeat(serial=serial)["changed"] is False
    assert len(answered_fast) == 2

    admin.delete(f"/agents/{agent.id}")
    agent.heartbeat(serial=serial, expect=403)
    assert len(answered_fast) == 2
