"""`manager_db.sightings`: the one "agent seen" statement of the heartbeat ledger and the bridge's ingest,
on SQLite and PostgreSQL: the newer sighting wins (the observation by `last_seen`, the status by when it
was reported), a revoked agent is not updated, None keeps a column."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from manager_db.models import Agent, as_utc
from manager_db.sightings import record_sightings, sighting

T0 = datetime(2026, 5, 1, 8, 0, 0, tzinfo=UTC)


def see(engine: Engine, *rows: dict[str, Any]) -> None:
    with engine.begin() as connection:
        record_sightings(connection, list(rows))


def stored(engine: Engine, agent_id: str) -> dict[str, Any]:
    with Session(engine) as session:
        agent = session.get(Agent, agent_id)
        assert agent is not None
        return {
            "last_seen": as_utc(agent.last_seen),
            "serial": agent.serial,
            "location_id": agent.location_id,
            "mode": agent.mode,
            "status": agent.status,
            "update_requested": agent.update_requested,
        }


def test_a_sighting_records_what_was_observed(engine: Engine) -> None:
    see(engine, sighting("a1", seen=T0, serial=4, location_id=7, mode="push", status={"hostname": "pc"}))

    assert stored(engine, "a1") == {
        "last_seen": T0,
        "serial": 4,
        "location_id": 7,
        "mode": "push",
        "status": {"hostname": "pc"},
        "update_requested": False,
    }
    assert stored(engine, "a2")["last_seen"] is None  # only the agent named


def test_the_newer_sighting_wins_whichever_comes_first(engine: Engine) -> None:
    see(engine, sighting("a1", seen=T0 + timedelta(seconds=10), serial=5, location_id=2, mode="push"))

    # An older observation written later (e.g. the ledger flushing after the bridge's ingest).
    see(engine, sighting("a1", seen=T0, serial=3, location_id=1, mode="pull"))

    assert stored(engine, "a1") == {
        "last_seen": T0 + timedelta(seconds=10),
        "serial": 5,
        "location_id": 2,
        "mode": "push",
        "status": {},
        "update_requested": False,
    }

    see(engine, sighting("a1", seen=T0 + timedelta(seconds=20), serial=6, mode="pull"))
    assert (stored(engine, "a1")["serial"], stored(engine, "a1")["mode"]) == (6, "pull")
    assert stored(engine, "a1")["last_seen"] == T0 + timedelta(seconds=20)


def test_a_heartbeat_flushed_after_a_newer_state_message_still_records_its_status(engine: Engine) -> None:
    with Session(engine) as session:
        agent = session.get(Agent, "a1")
        assert agent is not None
        agent.update_requested = True
        session.add(agent)
        session.commit()
    # The bridge ingests a state message (no status: MQTT state carries none) ...
    see(engine, sighting("a1", seen=T0 + timedelta(seconds=10), serial=5, mode="push"))
    # ... before the ledger flushes the heartbeat that came just before it, with the agent's new status
    # (sent once: the agent sends it only when it changed) and the update-now it was served.
    heartbeat = sighting("a1", seen=T0, serial=4, mode="pull", status={"disk": "ok"}, served_update=True)
    see(engine, heartbeat)

    assert stored(engine, "a1") == {
        "last_seen": T0 + timedelta(seconds=10),
        "serial": 5,
        "location_id": None,
        "mode": "push",
        "status": {"disk": "ok"},
        "update_requested": False,
    }


def test_an_older_status_never_replaces_a_newer_one(engine: Engine) -> None:
    # Two replicas: the newer heartbeat's bookkeeping is flushed first.
    see(engine, sighting("a1", seen=T0 + timedelta(seconds=10), serial=5, status={"disk": "full"}))
    see(engine, sighting("a1", seen=T0, serial=4, status={"disk": "ok"}))

    assert stored(engine, "a1")["status"] == {"disk": "full"}
    assert stored(engine, "a1")["serial"] == 5

    see(engine, sighting("a1", seen=T0 + timedelta(seconds=20), status={"disk": "ok"}))
    assert stored(engine, "a1")["status"] == {"disk": "ok"}


def test_a_sighting_at_the_same_moment_is_taken(engine: Engine) -> None:
    see(engine, sighting("a1", seen=T0, serial=1))
    see(engine, sighting("a1", seen=T0, serial=2))

    assert stored(engine, "a1")["serial"] == 2


def test_none_keeps_the_stored_column(engine: Engine) -> None:
    see(engine, sighting("a1", seen=T0, serial=4, location_id=7, mode="push", status={"hostname": "pc"}))

    later = T0 + timedelta(seconds=1)
    see(engine, sighting("a1", seen=later))  # observed nothing but the agent itself

    assert stored(engine, "a1") == {
        "last_seen": later,
        "serial": 4,
        "location_id": 7,
        "mode": "push",
        "status": {"hostname": "pc"},  # not JSON null: an absent status keeps the stored one
        "update_requested": False,
    }

    see(engine, sighting("a1", seen=later + timedelta(seconds=1), status={}))  # an empty status replaces
    assert stored(engine, "a1")["status"] == {}


def test_a_revoked_agent_is_not_updated(engine: Engine) -> None:
    with Session(engine) as session:
        agent = session.get(Agent, "revoked")
        assert agent is not None
        agent.revoked_at = T0
        agent.update_requested = True
        session.add(agent)
        session.commit()
    before = stored(engine, "revoked")

    see(
        engine,
        sighting("revoked", seen=T0 + timedelta(seconds=1), serial=9, mode="push", served_update=True),
        sighting("a1", seen=T0 + timedelta(seconds=1), serial=9),
    )

    assert stored(engine, "revoked") == before
    assert stored(engine, "a1")["serial"] == 9  # the batch's other rows are written


def test_a_served_update_clears_the_request_and_nothing_else_does(engine: Engine) -> None:
    with Session(engine) as session:
        for agent_id in ("a1", "a2"):
            agent = session.get(Agent, agent_id)
            assert agent is not None
            agent.update_requested = True
            session.add(agent)
        session.commit()

    see(
        engine,
        sighting("a1", seen=T0, serial=1, served_update=True),  # the heartbeat answered with the update
        sighting("a2", seen=T0, serial=1),  # e.g. a state message ingested by the bridge
    )

    assert stored(engine, "a1")["update_requested"] is False
    assert stored(engine, "a2")["update_requested"] is True


def test_no_rows_is_no_statement(engine: Engine) -> None:
    with engine.begin() as connection:
        record_sightings(connection, [])
    assert stored(engine, "a1")["last_seen"] is None
