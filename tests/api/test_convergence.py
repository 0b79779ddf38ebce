"""The convergence SLO on the real app, on SQLite and PostgreSQL: each change's `changes` row (its serial
range, written in its own transaction), `policycast_convergence_seconds` observed once per agent and
serial although the heartbeat (the api's ledger) and the state message (a bridge's ingest, the real
`StateIngest` fed as the broker feeds it) both report it, and `recent_changes` for the console."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session, col, select

from api.services.convergence import recent_changes
from broker_bridge.ingest import StateIngest
from broker_bridge.metrics import BridgeMetrics
from fabric_core.topics import DEFAULT_PREFIX, state_topic
from manager_db.models import AuditEntry, ChangeRecord, EffectiveConfig, as_utc, utcnow
from tests.support.clients import Admin, AgentClient
from tests.support.metrics import Samples, scrape
from tests.support.waiting import wait_for

CONVERGED = "policycast_convergence_seconds_count"


def engine_of(client: TestClient) -> Engine:
    engine: Engine = client.app.state.fabric.engine  # type: ignore[attr-defined]
    return engine


def changes(client: TestClient) -> list[ChangeRecord]:
    with Session(engine_of(client)) as session:
        return list(session.exec(select(ChangeRecord).order_by(col(ChangeRecord.generation))).all())


def serials(client: TestClient) -> dict[tuple[int, int], int]:
    with Session(engine_of(client)) as session:
        rows = session.exec(select(EffectiveConfig)).all()
        return {(row.group_id, row.location_id): row.serial for row in rows}


def test_a_change_records_its_commit_time_actor_and_serial_range(client: TestClient, admin: Admin) -> None:
    root = admin.root()["id"]
    admin.group("Sales", root)
    admin.group("Servers", root, inherit=False)
    before_serials, before = serials(client), utcnow()
    policy = admin.policy("fw", "firewall", {"default": "deny"})  # a policy alone changes no document
    admin.assign(root, policy)  # the root's documents and its inheriting child's, not Servers'
    after = utcnow()

    record = changes(client)[-1]
    changed = {key: serial for key, serial in serials(client).items() if before_serials.get(key) != serial}
    assert len(changed) == 2
    assert (record.first_serial, record.last_serial, record.documents) == (
        min(changed.values()),
        max(changed.values()),
        2,
    )
    assert before <= as_utc(record.committed_at) <= after
    assert record.actor == "bootstrap"
    with Session(engine_of(client)) as session:
        audit = session.exec(select(AuditEntry).where(col(AuditEntry.generation) == record.generation)).all()
    assert [row.action for row in audit] == ["policy.assign"]

    creation = changes(client)[-2]  # creating the policy: a change of no document
    assert (creation.first_serial, creation.last_serial, creation.documents) == (None, None, 0)
    assert creation.generation == record.generation - 1


def test_a_refused_change_records_nothing(client: TestClient, admin: Admin) -> None:
    before = changes(client)
    admin.put(f"/groups/{admin.root()['id']}/policies/firewall", {"policy_id": 999}, expect=422)
    assert changes(client) == before


def settle(client: TestClient, agent: AgentClient, location_id: int) -> int:
    """The agent's first document, applied and reported: it holds a serial (not an enrolment any more)."""
    serial = int(agent.heartbeat(serial=0, location_id=location_id)["serial"])
    agent.heartbeat(serial=serial, location_id=location_id)
    wait_for(lambda: stored_serial(client, agent.id) == serial, timeout=10, what="the first serial stored")
    return serial


def stored_serial(client: TestClient, agent_id: str) -> int:
    with engine_of(client).connect() as connection:
        return int(
            connection.execute(
                text("SELECT serial FROM agents WHERE id = :id"), {"id": agent_id}
            ).scalar_one()
        )


def state_message(agent_id: str, serial: int, location_id: int) -> tuple[str, bytes]:
    report = {
        "agent_id": agent_id,
        "online": True,
        "serial": serial,
        "location_id": location_id,
        "mode": "push",
    }
    return state_topic(DEFAULT_PREFIX, agent_id), orjson.dumps(report)


def test_each_agent_converging_is_observed_once_by_the_api_or_the_bridge(
    client: TestClient, admin: Admin
) -> None:
    root = admin.root()["id"]
    location = admin.default_location(root)["id"]
    first, second = admin.enroll(hostname="first"), admin.enroll(hostname="second")
    for agent in (first, second):
        settle(client, agent, location)
    bridge = BridgeMetrics(engine_of(client))
    ingest = StateIngest(
        prefix=DEFAULT_PREFIX, on_advances=bridge.convergence.observe, on_message=bridge.state_message
    )
    assert scrape(client).value(CONVERGED) == 0  # a first document is an enrolment, not a change

    admin.assign(root, admin.policy("fw", "firewall", {}))
    new = admin.effective(root)["serial"]
    # `first`: the heartbeat is recorded first, then its state message reaches the bridge.
    first.heartbeat(serial=new, location_id=location)
    wait_for(lambda: stored_serial(client, first.id) == new, timeout=10, what="the heartbeat's flush")
    ingest.handle(*state_message(first.id, new, location))
    # `second`: the other way round.
    ingest.handle(*state_message(second.id, new, location))
    ingest.flush(engine_of(client))
    second.heartbeat(serial=new, location_id=location)
    first.heartbeat(serial=new, location_id=location)  # and the next heartbeats, as ever
    ingest.handle(*state_message(first.id, new, location))
    ingest.flush(engine_of(client))
    wait_for(lambda: len(client.app.state.fabric.ledger) == 0, timeout=10, what="the last flush")  # type: ignore[attr-defined]

    api, bridged = scrape(client), Samples(_exposition(bridge))
    assert (api.value(CONVERGED), bridged.value(CONVERGED)) == (1, 1)
    assert bridged.value("policycast_state_messages_total", outcome="ingested") == 3
    for samples in (api, bridged):
        # Seconds from the commit to the report: on one machine, well under the 30 s bucket.
        assert samples.value("policycast_convergence_seconds_bucket", le="30.0") == 1
        assert 0 <= samples.value("policycast_convergence_seconds_sum") < 30


def _exposition(metrics: BridgeMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_recent_changes_tell_how_far_each_change_reached(client: TestClient, admin: Admin) -> None:
    root = admin.root()["id"]
    servers = admin.group("Servers", root, inherit=False)["id"]
    root_location = admin.default_location(root)["id"]
    servers_location = admin.default_location(servers)["id"]
    fleet = [admin.enroll(hostname=f"r{i}") for i in range(3)]
    server = admin.enroll(servers, hostname="s")
    for agent in fleet:
        settle(client, agent, root_location)
    settle(client, server, servers_location)

    admin.assign(root, admin.policy("fw", "firewall", {}))  # the root's document only
    root_change = admin.effective(root)["serial"]
    admin.assign(servers, admin.policy("av", "antivirus", {}))  # then Servers' own
    servers_change = admin.effective(servers)["serial"]
    for agent in fleet[:2]:  # two of the three reach the root's change
        agent.heartbeat(serial=root_change, location_id=root_location)
    server.heartbeat(serial=servers_change, location_id=servers_location)
    wait_for(lambda: stored_serial(client, server.id) == servers_change, timeout=10, what="the flush")
    wait_for(lambda: stored_serial(client, fleet[1].id) == root_change, timeout=10, what="the flush")

    with Session(engine_of(client)) as session:
        recent = recent_changes(session, limit=2)
    assert [(c.first_serial, c.agents_total, c.agents_on_serial) for c in recent] == [
        (servers_change, 1, 1),
        (root_change, 3, 2),
    ]
    assert [(c.action, c.target) for c in recent] == [
        ("policy.assign", f"group:{servers}"),
        ("policy.assign", f"group:{root}"),
    ]
    for summary in recent:
        assert summary.p50_s is not None and summary.p99_s is not None
        assert 0 <= summary.p50_s <= summary.p99_s < 30
        assert summary.actor == "bootstrap" and summary.documents == 1

    # A later change to the root's document takes its agents over: none on that serial yet.
    admin.assign(root, admin.policy("lu", "liveupdate", {}))
    with Session(engine_of(client)) as session:
        latest = recent_changes(session, limit=10)[0]
        assert (latest.agents_total, latest.agents_on_serial, latest.p50_s, latest.p99_s) == (
            3,
            0,
            None,
            None,
        )
        assert [c.agents_total for c in recent_changes(session, limit=10)][:3] == [3, 1, 0]


def test_recent_changes_of_an_empty_manager(client: TestClient) -> None:
    with Session(engine_of(client)) as session:
        summaries = recent_changes(session)
    # The root's first documents, and its documents naming the manager's CA: no agent yet.
    assert summaries and {(c.actor, c.agents_total, c.agents_on_serial, c.p50_s) for c in summaries} == {
        ("system", 0, 0, None)
    }


def test_an_agent_enrolled_after_a_change_is_timed_from_its_enrolment(
    client: TestClient, admin: Admin
) -> None:
    root = admin.root()["id"]
    location = admin.default_location(root)["id"]
    admin.assign(root, admin.policy("fw", "firewall", {}))
    engine = engine_of(client)
    with engine.begin() as connection:  # as if the change had been made an hour ago
        connection.execute(text("UPDATE changes SET committed_at = :t"), {"t": utcnow() - timedelta(hours=1)})
    agent = admin.enroll()
    settle(client, agent, location)
    with Session(engine) as session:
        latest: Any = recent_changes(session, limit=1)[0]
    assert (latest.agents_total, latest.agents_on_serial) == (1, 1)
    assert latest.p99_s is not None and latest.p99_s < 60
