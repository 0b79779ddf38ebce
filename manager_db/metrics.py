"""Prometheus metrics both manager processes serve, the api (`api.metrics`) and the bridge
(`broker_bridge.metrics`): the outbox, and the convergence SLO, observed by whichever of them records
an agent's new serial first (`manager_db.sightings`).

Each process registers them on its own `CollectorRegistry`, never the global default one, so that
several apps or bridges in one process (tests, `policycast up`) do not collide. What is read from SQL
is read at scrape time, at most once per `cache_s` whatever the number of scrapes (`ScrapeCache`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from manager_db.convergence import CommitTimes
from manager_db.models import as_utc, utcnow
from manager_db.sightings import Advance

log = logging.getLogger(__name__)
T = TypeVar("T")

CONVERGENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
"""From a push agent on a quiet broker (tens of ms) to a pull agent an hour-long heartbeat away."""
DEFAULT_CACHE_S = 5.0

_OUTBOX = text("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE published_at IS NULL")


class ScrapeCache(Generic[T]):
    """A value read from SQL, kept `cache_s`: a storm of scrapes costs one query per `cache_s`. One
    scrape reads at a time; the others wait for it and take what it read."""

    def __init__(self, read: Callable[[], T], *, cache_s: float) -> None:
        self._read = read
        self.cache_s = cache_s
        self._value: T | None = None
        self._at = float("-inf")
        self._lock = threading.Lock()

    def get(self) -> T:
        with self._lock:
            now = time.monotonic()
            if self._value is None or now - self._at >= self.cache_s:
                self._value = self._read()
                self._at = now
            return self._value


class OutboxCollector(Collector):
    """`policycast_outbox_depth` and `policycast_outbox_oldest_age_seconds`: documents waiting for a
    bridge to publish them, and how long the oldest has waited (0 when none waits)."""

    def __init__(self, engine: Engine, *, cache_s: float = DEFAULT_CACHE_S) -> None:
        self.engine = engine
        self._cache: ScrapeCache[tuple[int, datetime | None]] = ScrapeCache(self._read, cache_s=cache_s)

    def _read(self) -> tuple[int, datetime | None]:
        with self.engine.connect() as connection:
            count, oldest = connection.execute(_OUTBOX).one()
        if isinstance(oldest, str):  # SQLite: an aggregate loses the column's type
            oldest = datetime.fromisoformat(oldest)
        return int(count), as_utc(oldest)

    def describe(self) -> Iterator[Metric]:
        # Declared, so that registering does not call `collect` (a query) at construction.
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        try:
            depth, oldest = self._cache.get()
        except Exception:
            log.warning("metrics: could not read the outbox", exc_info=True)
            return iter(())
        age = 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds())
        depth_family, age_family = self._families()
        depth_family.add_metric([], depth)
        age_family.add_metric([], age)
        return iter((depth_family, age_family))

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("policycast_outbox_depth", "Outbox rows not published yet."),
            GaugeMetricFamily(
                "policycast_outbox_oldest_age_seconds",
                "Seconds the oldest unpublished outbox row has waited (0 when none waits).",
            ),
        )


class ConvergenceObserver:
    """`policycast_convergence_seconds`: from a change's commit to each agent reporting the serial it
    issued, observed once per agent and serial (`manager_db.sightings.Advance`), after the flush that
    recorded it committed. A serial of no known change (0, older than the `changes` table) is not."""

    def __init__(self, engine: Engine, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "policycast_convergence_seconds",
            "Seconds from a change's commit to an agent reporting the serial it issued "
            "(once per agent and serial, by the api or the bridge, whichever recorded it).",
            buckets=CONVERGENCE_BUCKETS,
            registry=registry,
        )
        self.times = CommitTimes(engine)

    def observe(self, advances: Sequence[Advance]) -> None:
        if not advances:
            return
        try:
            committed = self.times.lookup({advance.serial for advance in advances})
        except Exception:
            # The sightings are written; only their measurement is lost. Never fail the flush for it.
            log.warning("metrics: could not read the changes of %d advance(s)", len(advances), exc_info=True)
            return
        for advance in advances:
            at = committed.get(advance.serial)
            if at is not None:
                # Clamped: the api that committed and the process that saw may be machines apart.
                self.histogram.observe(max(0.0, (advance.seen - at).total_seconds()))
