"""`ApiMetrics`: what the api counts for Prometheus, served at `/metrics` (`api.routes.metrics`).

Counted as it happens, at the cost of a `Counter.inc` (a dict-free attribute and a lock held for an
addition): heartbeats by outcome and how many the fast path answered, enrolments, refused
credentials. Read from SQL at scrape time, at most once per `metrics_cache_s` (`ScrapeCache`): the
fleet by state (`api.services.fleet`) and the outbox. Observed when the heartbeat ledger's flush
records an agent's new serial: the convergence SLO (`manager_db.metrics.ConvergenceObserver`).

Every app has its own `CollectorRegistry`, so that several apps in one process do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlmodel import Session

from api.services.fleet import FleetCounts, fleet_counts
from manager_db.metrics import DEFAULT_CACHE_S, ConvergenceObserver, OutboxCollector, ScrapeCache
from manager_db.models import utcnow

log = logging.getLogger(__name__)

HEARTBEAT_OUTCOMES = ("unchanged", "changed", "refused", "invalid", "error")
"""`unchanged` and `changed` (a new document, or an "update now", served) are the 200s; `refused`:
401 or 403; `invalid`: any other 4xx; `error`: a 5xx."""


class ApiMetrics:
    """The api's metrics, on a registry of its own (`registry`)."""

    def __init__(self, engine: Engine, *, jitter: float, cache_s: float = DEFAULT_CACHE_S) -> None:
        self.registry = CollectorRegistry()
        heartbeats = Counter(
            "policycast_heartbeats",
            "Heartbeats answered, by outcome (unchanged, changed, refused, invalid, error).",
            ["outcome"],
            registry=self.registry,
        )
        # Children made once: the hot path increments an attribute, no label lookup.
        self.unchanged, self.changed, self.refused, self.invalid, self.error = (
            heartbeats.labels(outcome=outcome) for outcome in HEARTBEAT_OUTCOMES
        )
        self.fast_path_hits = Counter(
            "policycast_heartbeat_fast_path_hits",
            "Heartbeats answered from memory by the ASGI fast path, before routing.",
            registry=self.registry,
        )
        self.enrolments = Counter("policycast_enrolments", "Agents enrolled.", registry=self.registry)
        auth_failures = Counter(
            "policycast_auth_failures",
            "Requests refused for their credentials (401 or 403), by API (admin, agent).",
            ["api"],
            registry=self.registry,
        )
        self.admin_auth_failures = auth_failures.labels(api="admin")
        self.agent_auth_failures = auth_failures.labels(api="agent")
        self.convergence = ConvergenceObserver(engine, self.registry)
        self.registry.register(AgentsCollector(engine, jitter=jitter, cache_s=cache_s))
        self.registry.register(OutboxCollector(engine, cache_s=cache_s))

    def heartbeat_answered(self, *, changed: bool) -> None:
        (self.changed if changed else self.unchanged).inc()

    def heartbeat_refused(self, status: int) -> None:
        """A heartbeat answered with `status` >= 400 (the 200s count in `heartbeat_answered`)."""
        if status in (401, 403):
            self.refused.inc()
        elif 400 <= status < 500:
            self.invalid.inc()
        elif status >= 500:
            self.error.inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) of the registry in the format the scraper accepts: Prometheus's text
        format (0.0.4), or OpenMetrics when asked, as prometheus-client's own server answers."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class AgentsCollector(Collector):
    """The fleet by state, from SQL at scrape time (`api.services.fleet.fleet_counts`)."""

    def __init__(self, engine: Engine, *, jitter: float, cache_s: float) -> None:
        self.engine = engine
        self.jitter = jitter
        self._cache: ScrapeCache[FleetCounts] = ScrapeCache(self._read, cache_s=cache_s)

    def _read(self) -> FleetCounts:
        with Session(self.engine) as session:
            return fleet_counts(session, jitter=self.jitter, now=utcnow())

    def describe(self) -> Iterator[Metric]:
        # Declared, so that registering does not call `collect` (a query) at construction.
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self._cache.get()
        except Exception:
            log.warning("metrics: could not count the agents", exc_info=True)
            return iter(())
        by_state, by_mode, up_to_date, out_of_date = families = self._families()
        by_state.add_metric(["online"], counts.online)
        by_state.add_metric(["offline"], counts.offline)
        by_mode.add_metric(["push"], counts.push)
        by_mode.add_metric(["pull"], counts.pull)
        up_to_date.add_metric([], counts.up_to_date)
        out_of_date.add_metric([], counts.out_of_date)
        return iter(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "policycast_agents", "Agents (not revoked) by presence: online, offline.", labels=["state"]
            ),
            GaugeMetricFamily(
                "policycast_agents_by_mode",
                "Agents (not revoked) by the transport they last reported: push, pull.",
                labels=["mode"],
            ),
            GaugeMetricFamily(
                "policycast_agents_up_to_date",
                "Agents (not revoked) holding their current document's serial or a later one.",
            ),
            GaugeMetricFamily(
                "policycast_agents_out_of_date",
                "Agents (not revoked) behind their current document's serial (or without a document).",
            ),
        )
