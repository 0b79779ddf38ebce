"""The convergence SLO's bookkeeping in the database, on SQLite and PostgreSQL: `agents.serial_at` moves
only when the serial does, `record_sightings` reports an agent's advance to a new serial once however
many sightings report it (the heartbeat and the state message of one agent, flushed by two processes
at once), and `CommitTimes` finds a serial's change in `changes` with one query per new change."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text
from sqlmodel import Session

from manager_db.convergence import CommitTimes
from manager_db.database import make_engine
from manager_db.models import Agent, ChangeRecord, as_utc
from manager_db.sightings import ADVANCE_CHUNK, Advance, record_sightings, sighting
from tests.support.waiting import wait_for

T0 = datetime(2026, 5, 1, 8, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def see(engine: Engine, *rows: dict[str, Any]) -> list[Advance]:
    with engine.begin() as connection:
        return record_sightings(connection, list(rows))


def held(engine: Engine, agent_id: str) -> tuple[int, datetime | None]:
    with Session(engine) as session:
        agent = session.get(Agent, agent_id)
        assert agent is not None
        return agent.serial, as_utc(agent.serial_at)


def test_serial_at_moves_only_when_the_serial_changes(engine: Engine) -> None:
    see(engine, sighting("a1", seen=at(0), serial=0, location_id=1))
    assert held(engine, "a1") == (0, None)  # enrolled, holding nothing: the serial did not change

    see(engine, sighting("a1", seen=at(1), serial=5, location_id=1))
    assert held(engine, "a1") == (5, at(1))
    see(engine, sighting("a1", seen=at(2), serial=5, location_id=1))  # the same serial, reported again
    see(engine, sighting("a1", seen=at(3), location_id=1))  # a sighting that observed no serial
    assert held(engine, "a1") == (5, at(1))

    see(engine, sighting("a1", seen=at(4), serial=3, location_id=2))  # a location of a lower serial
    assert held(engine, "a1") == (3, at(4))
    see(engine, sighting("a1", seen=at(0.5), serial=9, location_id=2))  # older than what is stored
    assert held(engine, "a1") == (3, at(4))


def test_an_advance_is_a_higher_serial_at_the_same_location_by_an_agent_that_held_one(engine: Engine) -> None:
    # Enrolment: from nothing to a first document is not a change reaching the agent.
    assert see(engine, sighting("a1", seen=at(0), serial=5, location_id=1)) == []
    # The change: its new serial, at the location the agent held.
    assert see(engine, sighting("a1", seen=at(1), serial=7, location_id=1)) == [Advance("a1", 7, at(1))]
    assert held(engine, "a1") == (7, at(1))
    # Reported again (the next heartbeat, a retained state message): nothing new.
    assert see(engine, sighting("a1", seen=at(2), serial=7, location_id=1)) == []
    # A state message without a location keeps the stored one: still the same document.
    assert see(engine, sighting("a1", seen=at(3), serial=8)) == [Advance("a1", 8, at(3))]
    # A location switch lands on another document (of an older change, here even a higher serial).
    assert see(engine, sighting("a1", seen=at(4), serial=12, location_id=2)) == []
    assert held(engine, "a1") == (12, at(4))
    # A sighting older than the stored one writes nothing, so counts nothing.
    assert see(engine, sighting("a1", seen=at(3.5), serial=20, location_id=2)) == []
    assert held(engine, "a1") == (12, at(4))


def test_a_revoked_agent_does_not_advance(engine: Engine) -> None:
    see(engine, sighting("revoked", seen=at(0), serial=5, location_id=1))
    with Session(engine) as session:
        session.execute(text("UPDATE agents SET revoked_at = :t WHERE id = 'revoked'"), {"t": at(0.5)})
        session.commit()
    assert see(engine, sighting("revoked", seen=at(1), serial=6, location_id=1)) == []
    assert held(engine, "revoked")[0] == 5


def test_a_batch_advances_each_agent_and_later_sightings_of_its_serial_count_nothing(engine: Engine) -> None:
    see(engine, *(sighting(a, seen=at(0), serial=5, location_id=1) for a in ("a1", "a2")))
    first = see(
        engine,
        sighting("a1", seen=at(1), serial=6, location_id=1),
        sighting("a2", seen=at(1), serial=6, location_id=1),
    )
    assert sorted(first, key=lambda a: a.agent_id) == [Advance("a1", 6, at(1)), Advance("a2", 6, at(1))]
    # The other process's sightings of the same serials, a moment later or earlier: written, not counted.
    assert see(engine, sighting("a1", seen=at(2), serial=6, location_id=1)) == []
    assert see(engine, sighting("a2", seen=at(0.9), serial=6, location_id=1)) == []


def test_concurrent_flushes_of_the_same_new_serial_count_it_once(engine: Engine, database_url: str) -> None:
    """The api's ledger and the bridge's ingest, each in its own transaction on its own connection:
    the second waits for the first's lock (a PostgreSQL row lock, SQLite's write lock) and then finds
    the serial written."""
    see(engine, sighting("a1", seen=at(0), serial=5, location_id=1))
    other = make_engine(database_url)
    results: dict[str, list[Advance]] = {}
    try:
        with engine.begin() as connection:
            results["heartbeat"] = record_sightings(
                connection, [sighting("a1", seen=at(1), serial=6, location_id=1)]
            )

            def state_message() -> None:
                with other.begin() as theirs:
                    results["state"] = record_sightings(
                        theirs, [sighting("a1", seen=at(1.5), serial=6, location_id=1, mode="push")]
                    )

            thread = threading.Thread(target=state_message)
            thread.start()
            if engine.dialect.name == "postgresql":
                wait_for(lambda: _waiting_on_a_lock(engine), timeout=10, what="the second flush to wait")
        thread.join(timeout=30)
    finally:
        other.dispose()
    assert not thread.is_alive()
    assert results == {"heartbeat": [Advance("a1", 6, at(1))], "state": []}
    assert held(engine, "a1") == (6, at(1))


def _waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        ).scalar_one()
    return int(waiting) > 0


def test_a_fleet_advances_in_chunks(engine: Engine) -> None:
    count = ADVANCE_CHUNK + 10
    with Session(engine) as session:
        session.add_all(
            Agent(id=f"f{i:05d}", hostname="h", group_id=1, secret_hash=f"fleet-{i}", serial=5, location_id=1)
            for i in range(count)
        )
        session.commit()
    rows = [sighting(f"f{i:05d}", seen=at(1), serial=6, location_id=1) for i in range(count)]
    advances = see(engine, *rows)
    assert len(advances) == count
    assert {advance.agent_id for advance in advances} == {f"f{i:05d}" for i in range(count)}


def record_change(
    engine: Engine, generation: int, first: int | None, last: int | None, committed: datetime
) -> None:
    with Session(engine) as session:
        documents = 0 if first is None or last is None else last - first + 1
        session.add(
            ChangeRecord(
                generation=generation,
                committed_at=committed,
                actor="test",
                first_serial=first,
                last_serial=last,
                documents=documents,
            )
        )
        session.commit()


def test_commit_times_find_a_serials_change_and_read_only_what_is_new(engine: Engine) -> None:
    record_change(engine, 1, 1, 3, at(0))
    record_change(engine, 2, None, None, at(1))  # a change that issued no serial
    record_change(engine, 3, 4, 4, at(2))
    times = CommitTimes(engine)

    assert times.lookup({1, 3, 4}) == {1: at(0), 3: at(0), 4: at(2)}
    assert times.lookup({0, 2}) == {2: at(0)}  # 0: no change issues it
    assert times.reads == 1

    record_change(engine, 4, 5, 9, at(3))
    assert times.lookup({9, 2}) == {9: at(3), 2: at(0)}  # a serial above what it holds: read the new
    assert times.reads == 2
    assert times.lookup({10}) == {}  # unknown (no change yet): one read, per flush at most
    assert times.reads == 3
    assert times.lookup({4, 5}) == {4: at(2), 5: at(3)}
    assert times.reads == 3


def test_commit_times_keep_only_the_latest_changes(engine: Engine) -> None:
    for generation in range(1, 6):
        record_change(engine, generation, generation * 10, generation * 10 + 1, at(generation))
    times = CommitTimes(engine, keep=2)

    assert times.lookup({10, 40, 51}) == {40: at(4), 51: at(5)}
    record_change(engine, 6, 60, 60, at(6))
    assert times.lookup({40, 60}) == {60: at(6)}  # 40's change is no longer held
