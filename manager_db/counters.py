"""The `fabric_counters` row: the change lock, the global serial counter and the change generation.

Every operator change runs in one transaction that starts with `begin_change`, which bumps the
generation counter. On PostgreSQL that row lock serialises changes (so two recomputations never race);
on SQLite it takes the write lock before anything is read. Serials are allocated in blocks from the
same row (`allocate_serials`), so commit order is serial order. Other processes poll `generation` to
learn that something changed.
"""

from __future__ import annotations

from sqlalchemy import Engine, text
from sqlmodel import Session


def begin_change(session: Session) -> int:
    """Take the change lock for this transaction; return the new generation."""
    row = session.execute(
        text("UPDATE fabric_counters SET generation = generation + 1 WHERE id = 1 RETURNING generation")
    ).one()
    return int(row[0])


def allocate_serials(session: Session, count: int) -> range:
    """Reserve `count` consecutive serials from the global counter (inside a change)."""
    row = session.execute(
        text("UPDATE fabric_counters SET serial = serial + :n WHERE id = 1 RETURNING serial"), {"n": count}
    ).one()
    last = int(row[0])
    return range(last - count + 1, last + 1)


def read_counters(session: Session) -> tuple[int, int]:
    row = session.execute(text("SELECT serial, generation FROM fabric_counters WHERE id = 1")).one()
    return int(row[0]), int(row[1])


def read_counters_outside(engine: Engine) -> tuple[int, int]:
    """(serial, generation), read in a short transaction of its own."""
    with Session(engine) as session:
        return read_counters(session)
