"""GET /metrics on the api: Prometheus's text format, parsed by prometheus-client's own parser, against
the real app on SQLite and PostgreSQL: heartbeats by outcome, the fast path, enrolments, refused
credentials, the fleet by state and the outbox as the database holds them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, text
from sqlmodel import Session, col, func, select

from api.main import create_app
from fabric_core.settings import Settings
from manager_db.models import Agent, OutboxEntry
from tests.support.clients import Admin, AgentClient
from tests.support.metrics import Samples, scrape
from tests.support.waiting import wait_for


@pytest.fixture
def live_client(settings: Settings) -> Iterator[TestClient]:
    """The app with metrics read from SQL at every scrape (no `metrics_cache_s`)."""
    with TestClient(create_app(settings.model_copy(update={"metrics_cache_s": 0.0}))) as client:
        yield client


def heartbeats(samples: Samples, outcome: str) -> float:
    return samples.value("policycast_heartbeats_total", outcome=outcome)


def test_metrics_are_prometheus_text_without_credentials_and_not_in_the_openapi_document(
    client: TestClient,
) -> None:
    response = client.get("/metrics")  # no Authorization: it is what Prometheus scrapes

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")  # any Prometheus reads it
    samples = Samples(response.text)
    assert samples.families, "metrics parse and say something"
    assert all(name.startswith("policycast_") for name in samples.families)
    for family in (
        "policycast_heartbeats",
        "policycast_heartbeat_fast_path_hits",
        "policycast_enrolments",
        "policycast_auth_failures",
        "policycast_agents",
        "policycast_agents_by_mode",
        "policycast_agents_up_to_date",
        "policycast_agents_out_of_date",
        "policycast_outbox_depth",
        "policycast_outbox_oldest_age_seconds",
        "policycast_convergence_seconds",
    ):
        assert family in samples.families, family
    assert samples.families["policycast_convergence_seconds"].type == "histogram"
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_two_apps_in_one_process_count_apart(settings: Settings, tmp_path: Any) -> None:
    other = settings.model_copy(update={"data_dir": tmp_path / "other"})
    with TestClient(create_app(settings)) as first, TestClient(create_app(other)) as second:
        Admin(first).enroll()
        assert scrape(first).value("policycast_enrolments_total") == 1
        assert scrape(second).value("policycast_enrolments_total") == 0


def test_heartbeats_count_by_outcome_and_the_fast_path_hits(
    client: TestClient, admin: Admin, answered_fast: list[bytes]
) -> None:
    agent = admin.enroll()
    first = agent.heartbeat()  # holds nothing yet: the document is served
    assert first["changed"] is True
    answered_fast.clear()
    before = scrape(client)

    current = agent.heartbeat(serial=first["serial"], location_id=first["config"]["doc"]["location_id"])
    assert current["changed"] is False
    assert answered_fast, "the everyday heartbeat was answered by the fast path"
    after = scrape(client)
    assert heartbeats(after, "unchanged") - heartbeats(before, "unchanged") == 1
    assert heartbeats(after, "changed") == heartbeats(before, "changed") >= 1
    assert (
        after.value("policycast_heartbeat_fast_path_hits_total")
        - before.value("policycast_heartbeat_fast_path_hits_total")
        == 1
    )

    # A document changed since: served, by the fast path too.
    admin.assign(admin.root()["id"], admin.policy("fw", "firewall", {"default": "deny"}))
    wait_for(
        lambda: agent.heartbeat(serial=first["serial"])["changed"],
        timeout=10,
        what="the new document in the heartbeat cache",
    )
    changed = scrape(client)
    assert heartbeats(changed, "changed") - heartbeats(after, "changed") >= 1

    # Refused: an unknown secret (401) counts as a refused heartbeat and an agent credential failure.
    stranger = AgentClient(client, {**agent.enrolment, "secret": "pcas_nobody"})
    stranger.heartbeat(expect=401)
    # Invalid: a body the route refuses (422), with good credentials.
    agent.heartbeat({"serial": "one", "mode": "pull"}, expect=422)
    final = scrape(client)
    assert heartbeats(final, "refused") - heartbeats(changed, "refused") == 1
    assert heartbeats(final, "invalid") - heartbeats(changed, "invalid") == 1
    assert final.value("policycast_auth_failures_total", api="agent") == 1
    assert final.value("policycast_heartbeat_fast_path_hits_total") == changed.value(
        "policycast_heartbeat_fast_path_hits_total"
    )


def test_enrolments_and_refused_admin_credentials_count(client: TestClient, admin: Admin) -> None:
    before = scrape(client)
    admin.enroll(hostname="a")
    admin.enroll(hostname="b")
    assert client.get("/api/v1/groups", headers={"Authorization": "Bearer pck_wrong"}).status_code == 401
    assert client.get("/api/v1/groups").status_code == 401
    viewer = admin.post("/api-keys", {"name": "watcher", "role": "viewer"})["key"]
    refused = client.post(
        "/api/v1/groups", json={"name": "x", "parent_id": 1}, headers={"Authorization": f"Bearer {viewer}"}
    )
    assert refused.status_code == 403

    after = scrape(client)
    assert after.value("policycast_enrolments_total") - before.value("policycast_enrolments_total") == 2
    assert after.value("policycast_auth_failures_total", api="admin") == 3
    assert after.value("policycast_auth_failures_total", api="agent") == 0


def _counts(client: TestClient) -> dict[str, float]:
    samples = scrape(client)
    return {
        "online": samples.value("policycast_agents", state="online"),
        "offline": samples.value("policycast_agents", state="offline"),
        "push": samples.value("policycast_agents_by_mode", mode="push"),
        "pull": samples.value("policycast_agents_by_mode", mode="pull"),
        "up_to_date": samples.value("policycast_agents_up_to_date"),
        "out_of_date": samples.value("policycast_agents_out_of_date"),
    }


def test_agents_by_state_are_what_the_database_holds(live_client: TestClient) -> None:
    admin = Admin(live_client)
    root = admin.root()["id"]
    current = admin.enroll(hostname="current")
    behind = admin.enroll(hostname="behind")
    admin.enroll(hostname="silent")  # never heartbeats: offline, out of date (holds nothing)
    revoked = admin.enroll(hostname="revoked")
    document = admin.effective(root)
    current.heartbeat(serial=document["serial"], location_id=document["location_id"], mode="push")
    behind.heartbeat(serial=0, mode="pull")
    admin.delete(f"/agents/{revoked.id}")

    expected = {"online": 2, "offline": 1, "push": 1, "pull": 2, "up_to_date": 1, "out_of_date": 2}
    wait_for(
        lambda: _counts(live_client),
        until=lambda counts: counts == expected,
        timeout=10,
        what="the heartbeats' bookkeeping in the metrics",
    )
    # The same as the operator's view says, agent by agent.
    views = [admin.agent(a.id) for a in (current, behind)]
    assert [(v["online"], v["up_to_date"], v["mode"]) for v in views] == [
        (True, True, "push"),
        (True, False, "pull"),
    ]

    # A change puts the up-to-date agent behind its document.
    admin.assign(root, admin.policy("fw", "firewall", {"default": "deny"}))
    assert _counts(live_client)["up_to_date"] == 0

    # A push agent the broker reports offline (its last will) is offline, whatever its last heartbeat.
    with Session(live_client.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        session.execute(text("UPDATE agents SET online = false WHERE id = :id"), {"id": current.id})
        session.commit()
    assert _counts(live_client)["online"] == 1


def test_outbox_depth_and_age_are_the_unpublished_rows(live_client: TestClient) -> None:
    admin = Admin(live_client)
    engine: Engine = live_client.app.state.fabric.engine  # type: ignore[attr-defined]
    admin.assign(admin.root()["id"], admin.policy("fw", "firewall", {}))  # no bridge here: it waits

    with Session(engine) as session:
        waiting = session.exec(
            select(func.count()).select_from(OutboxEntry).where(col(OutboxEntry.published_at).is_(None))
        ).one()
    samples = scrape(live_client)
    assert waiting >= 2
    assert samples.value("policycast_outbox_depth") == waiting
    assert samples.value("policycast_outbox_oldest_age_seconds") > 0

    with Session(engine) as session:  # what a bridge does once the broker acknowledged them
        session.execute(text("UPDATE outbox SET published_at = created_at"))
        session.commit()
    samples = scrape(live_client)
    assert samples.value("policycast_outbox_depth") == 0
    assert samples.value("policycast_outbox_oldest_age_seconds") == 0


def test_a_storm_of_scrapes_reads_the_database_once_per_cache_period(client: TestClient) -> None:
    engine: Engine = client.app.state.fabric.engine  # type: ignore[attr-defined]
    scrape(client)  # the first scrape reads (and the app's cache holds it for metrics_cache_s = 5)
    reads: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM outbox" in statement or "FROM agents" in statement:
            reads.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        for _ in range(20):
            scrape(client)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert reads == []


def test_revoked_agents_are_not_counted(live_client: TestClient) -> None:
    admin = Admin(live_client)
    gone = admin.enroll()
    admin.delete(f"/agents/{gone.id}")
    with Session(live_client.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        assert session.exec(select(func.count()).select_from(Agent)).one() == 1
    counts = _counts(live_client)
    assert counts["online"] + counts["offline"] == 0
    assert counts["up_to_date"] + counts["out_of_date"] == 0


def test_openmetrics_when_the_scraper_asks_for_it(client: TestClient) -> None:
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
