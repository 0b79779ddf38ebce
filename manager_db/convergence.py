"""Which change issued a serial, and when it committed: the start of the convergence SLO's clock.

Every committed change has a row in `changes` (`ChangeRecord`) with the serials it issued, one
consecutive range, and its commit time. `CommitTimes` keeps the ranges of the recent changes in memory
and answers "when did the change of serial S commit?" for a flush's advances (`manager_db.sightings`)
without a query per agent: it reads `changes` again only for a serial above every range it holds, so
at most once per flush, and then only the rows it has not seen.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from manager_db.models import ChangeRecord, as_utc

KEEP_CHANGES = 10_000
"""How many of the latest changes with documents are held: a serial of an older one (an agent back
after a very long time) is not measured, rather than held forever."""


class CommitTimes:
    """Serial -> the commit time of the change that issued it, for the recent changes."""

    def __init__(self, engine: Engine, *, keep: int = KEEP_CHANGES) -> None:
        self.engine = engine
        self.keep = keep
        self._firsts: list[int] = []
        self._ranges: list[tuple[int, int, datetime]] = []
        """(first_serial, last_serial, committed_at), by first_serial; `_firsts` for bisect."""
        self._through = 0
        """The highest serial of the ranges read so far."""
        self._loaded = False
        self._lock = threading.Lock()
        self.reads = 0
        """How many times `changes` was read (tests: a flush costs at most one)."""

    def lookup(self, serials: Collection[int]) -> dict[int, datetime]:
        """The commit time of each serial's change; serials of no known change are left out."""
        if not serials:
            return {}
        with self._lock:
            if not self._loaded or max(serials) > self._through:
                self._read()
            found: dict[int, datetime] = {}
            for serial in serials:
                at = self._find(serial)
                if at is not None:
                    found[serial] = at
            return found

    def _find(self, serial: int) -> datetime | None:
        index = bisect.bisect_right(self._firsts, serial) - 1
        if index < 0:
            return None
        first, last, at = self._ranges[index]
        return at if first <= serial <= last else None

    def _read(self) -> None:
        query = select(
            col(ChangeRecord.first_serial), col(ChangeRecord.last_serial), col(ChangeRecord.committed_at)
        ).where(col(ChangeRecord.last_serial).is_not(None))
        if self._loaded:
            query = query.where(col(ChangeRecord.last_serial) > self._through)
        query = query.order_by(col(ChangeRecord.last_serial).desc()).limit(self.keep)
        with Session(self.engine) as session:
            rows = session.exec(query).all()
        self.reads += 1
        self._loaded = True
        newer = [
            (int(first), int(last), as_utc(at))
            for first, last, at in reversed(rows)
            if first is not None and last is not None
        ]
        if not newer:
            return
        # Changes commit in serial order (the change lock), so what is read now comes after what is held.
        self._ranges = (self._ranges + newer)[-self.keep :]
        self._firsts = [first for first, _, _ in self._ranges]
        self._through = max(self._through, self._ranges[-1][1])
