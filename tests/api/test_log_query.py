"""`api.services.logs.query_logs`'s filters by category and by client (an agent id or a host name,
which several agents may share), and `hostnames`; on both backends, with batches uploaded as agents
upload them."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlmodel import Session

from api.services import logs
from tests.support.clients import AgentClient


def entry(ts: str, message: str, **more: Any) -> dict[str, Any]:
    return {"ts": ts, "message": message, "level": "info", **more}


def upload(agent: AgentClient, entries: list[dict[str, Any]]) -> None:
    agent.heartbeat(serial=0, logs={"batch_id": "b1", "entries": entries})


def messages(manager: TestClient, **filters: Any) -> list[str]:
    with Session(manager.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        return [record.message for record in logs.query_logs(session, **filters)]


def test_logs_filter_by_category_and_by_client_id_or_host_name(client, admin, enroll):
    laptop, twin, server = enroll(hostname="laptop"), enroll(hostname="laptop"), enroll(hostname="server")
    upload(
        laptop,
        [entry("2024-05-01T08:00:00Z", "scan", category="antivirus"), entry("2024-05-01T09:00:00Z", "boot")],
    )
    upload(twin, [entry("2024-05-01T10:00:00Z", "twin scan", category="antivirus")])
    upload(server, [entry("2024-05-01T11:00:00Z", "server update", category="liveupdate")])

    assert messages(client, category="antivirus") == ["twin scan", "scan"]
    assert messages(client, category="liveupdate") == ["server update"]
    assert messages(client, category="nothing") == []
    assert messages(client, client=laptop.id) == ["boot", "scan"]  # by id: that agent only
    assert messages(client, client="laptop") == ["twin scan", "boot", "scan"]  # by name: every laptop
    assert messages(client, client="server", category="antivirus") == []
    assert messages(client, client="laptop", category="antivirus", limit=1, offset=1) == ["scan"]
    assert messages(client, client="nobody") == []
    assert len(messages(client)) == 4  # no filter: all of them


def test_hostnames_names_each_agent_once(client, admin, enroll):
    laptop, server = enroll(hostname="laptop"), enroll(hostname="server")
    with Session(client.app.state.fabric.engine) as session:
        assert logs.hostnames(session, agent_ids={laptop.id, server.id, "unknown"}) == {
            laptop.id: "laptop",
            server.id: "server",
        }
        assert logs.hostnames(session, agent_ids=set()) == {}
