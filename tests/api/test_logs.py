"""Log batches uploaded with heartbeats: stored exactly once per (agent, batch id), then queried."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tests.support.clients import AgentClient


def entry(ts: str, message: str, level: str = "info", **more: Any) -> dict[str, Any]:
    return {"ts": ts, "message": message, "level": level, **more}


def upload(agent: AgentClient, batch_id: str, entries: list[dict[str, Any]], expect: int = 200) -> Any:
    return agent.heartbeat(serial=0, logs={"batch_id": batch_id, "entries": entries}, expect=expect)


def messages(records: list[dict[str, Any]]) -> list[str]:
    return [record["message"] for record in records]


def instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


DAY = [
    entry("2024-05-01T08:00:00Z", "boot"),
    entry("2024-05-01T09:00:00Z", "scan started", category="antivirus"),
    entry("2024-05-01T10:00:00Z", "threat found", level="security", category="antivirus", data={"file": "x"}),
    entry("2024-05-01T11:00:00Z", "update failed", level="error", category="liveupdate"),
    entry("2024-05-01T12:00:00Z", "shutdown"),
]


def test_a_heartbeat_stores_its_log_batch(admin, enroll):
    agent = enroll()

    reply = upload(agent, "batch-1", DAY)

    assert reply["changed"] is True  # the heartbeat still answers as ever
    records = admin.get(f"/agents/{agent.id}/logs")
    assert messages(records) == ["shutdown", "update failed", "threat found", "scan started", "boot"]
    threat = records[2]
    assert threat["agent_id"] == agent.id
    assert threat["group_id"] == agent.group_id
    assert threat["batch_id"] == "batch-1"
    assert (threat["level"], threat["category"], threat["data"]) == ("security", "antivirus", {"file": "x"})
    assert instant(threat["ts"]) == instant("2024-05-01T10:00:00Z")
    assert records[0]["category"] == "agent"  # the default
    assert admin.get(f"/groups/{agent.group_id}/logs") == records


def test_logs_filter_by_level_and_time_and_page(admin, enroll):
    agent = enroll()
    upload(agent, "batch-1", DAY)
    path = f"/agents/{agent.id}/logs"

    assert messages(admin.get(path, params={"level": "error"})) == ["update failed"]
    assert messages(admin.get(path, params={"level": "info"})) == ["shutdown", "scan started", "boot"]
    window = {"since": "2024-05-01T09:00:00Z", "until": "2024-05-01T11:00:00Z"}  # since inclusive, until not
    assert messages(admin.get(path, params=window)) == ["threat found", "scan started"]
    assert messages(admin.get(path, params={"since": "2024-05-01T11:00:00Z"})) == [
        "shutdown",
        "update failed",
    ]

    pages = [admin.get(path, params={"limit": 2, "offset": offset}) for offset in (0, 2, 4)]
    assert [messages(page) for page in pages] == [
        ["shutdown", "update failed"],
        ["threat found", "scan started"],
        ["boot"],
    ]
    assert admin.get(path, params={"level": "loud"}, expect=422)["detail"]
    assert admin.get(path, params={"since": "yesterday"}, expect=422)["detail"]


def test_times_in_other_offsets_are_the_same_instants(admin, enroll):
    agent = enroll()
    upload(
        agent,
        "batch-tz",
        [
            entry("2024-05-01T12:30:00+02:00", "half past ten UTC"),
            entry("2024-05-01T10:00:00Z", "ten UTC"),
            entry("2024-05-01T07:00:00-05:00", "noon UTC"),
            entry("2024-05-01T11:00:00", "eleven, no offset: UTC"),
        ],
    )
    path = f"/agents/{agent.id}/logs"

    records = admin.get(path)

    assert messages(records) == ["noon UTC", "eleven, no offset: UTC", "half past ten UTC", "ten UTC"]
    assert instant(records[2]["ts"]) == instant("2024-05-01T10:30:00Z")
    assert instant(records[1]["ts"]) == instant("2024-05-01T11:00:00Z")
    after = admin.get(
        path, params={"since": "2024-05-01T12:15:00+02:00", "until": "2024-05-01T07:00:00-05:00"}
    )
    assert messages(after) == ["eleven, no offset: UTC", "half past ten UTC"]  # 10:15 to 12:00 UTC


def test_group_logs_gather_the_groups_agents_only(admin, enroll):
    root = admin.root()["id"]
    branch = admin.group("Branch", root)
    first, second = enroll(group_id=branch["id"], hostname="a"), enroll(group_id=branch["id"], hostname="b")
    elsewhere = enroll(hostname="c")
    upload(first, "b1", [entry("2024-05-01T08:00:00Z", "from a"), entry("2024-05-01T10:00:00Z", "a again")])
    upload(second, "b1", [entry("2024-05-01T09:00:00Z", "from b", level="error")])
    upload(elsewhere, "b1", [entry("2024-05-01T09:30:00Z", "from c")])

    path = f"/groups/{branch['id']}/logs"

    assert messages(admin.get(path)) == ["a again", "from b", "from a"]
    assert messages(admin.get(path, params={"level": "error"})) == ["from b"]
    assert messages(admin.get(path, params={"until": "2024-05-01T09:00:00Z"})) == ["from a"]
    assert messages(admin.get(path, params={"limit": 1, "offset": 1})) == ["from b"]
    assert messages(admin.get(f"/groups/{root}/logs")) == ["from c"]


def test_a_retried_batch_is_stored_once(admin, enroll):
    agent = enroll()
    batch = [entry("2024-05-01T08:00:00Z", "once"), entry("2024-05-01T08:01:00Z", "only once")]

    upload(agent, "batch-7", batch)
    upload(agent, "batch-7", batch)  # the response was lost: the agent sends it again

    assert messages(admin.get(f"/agents/{agent.id}/logs")) == ["only once", "once"]
    upload(agent, "batch-8", [entry("2024-05-01T09:00:00Z", "next")])
    assert len(admin.get(f"/agents/{agent.id}/logs")) == 3


def test_another_agent_may_reuse_a_batch_id(admin, enroll):
    first, second = enroll(hostname="a"), enroll(hostname="b")

    upload(first, "batch-1", [entry("2024-05-01T08:00:00Z", "from a")])
    upload(second, "batch-1", [entry("2024-05-01T08:00:00Z", "from b")])

    assert messages(admin.get(f"/agents/{first.id}/logs")) == ["from a"]
    assert messages(admin.get(f"/agents/{second.id}/logs")) == ["from b"]


def test_a_malformed_batch_stores_nothing(admin, enroll):
    agent = enroll()
    good = entry("2024-05-01T08:00:00Z", "fine")

    for batch in (
        {"batch_id": "b1", "entries": [good, entry("2024-05-01T08:00:00Z", "x", level="loud")]},
        {"batch_id": "b1", "entries": [good, {"ts": "not a time", "message": "x"}]},
        {"batch_id": "b1", "entries": [good, {**good, "colour": "red"}]},
        {"batch_id": "has spaces", "entries": [good]},
        {"batch_id": "", "entries": [good]},
    ):
        assert agent.heartbeat(serial=0, logs=batch, expect=422)["detail"]

    assert admin.get(f"/agents/{agent.id}/logs") == []
    upload(agent, "b1", [good])  # the id was not used up by the refused uploads
    assert messages(admin.get(f"/agents/{agent.id}/logs")) == ["fine"]


def test_logs_of_unknown_agents_or_groups_are_404(admin):
    assert admin.get("/agents/no-such-agent/logs", expect=404)["detail"]
    assert admin.get("/groups/999999/logs", expect=404)["detail"]
