"""`BridgeMetrics`: what a bridge counts for Prometheus, served on a port of its own.

`bridge_metrics_port` (default 9465) on `bridge_metrics_host` (default 127.0.0.1): 0 takes a free
port and logs it, `off` serves nothing. A port that cannot be bound is logged and the bridge runs on
without metrics: relaying documents matters more than being watched doing it.

- `policycast_publish_latency_seconds`: from an outbox row's `created_at` (its change, in the same
  transaction) to the broker's acknowledgement of its publish (`broker_bridge.relay.relay_outbox`);
- `policycast_documents_published_total`: documents the broker acknowledged, from the outbox;
- `policycast_state_messages_total{outcome="ingested"|"dropped"}`: agent state messages;
- `policycast_outbox_depth`, `policycast_outbox_oldest_age_seconds` and the convergence SLO
  `policycast_convergence_seconds` (for the agents whose new serial this bridge's ingest recorded
  first), shared with the api (`manager_db.metrics`).
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from sqlalchemy import Engine

from manager_db.metrics import DEFAULT_CACHE_S, ConvergenceObserver, OutboxCollector

log = logging.getLogger(__name__)

PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class BridgeMetrics:
    """A bridge's metrics, on a registry of its own (`registry`), and the server that serves them."""

    def __init__(self, engine: Engine, *, cache_s: float = DEFAULT_CACHE_S) -> None:
        self.registry = CollectorRegistry()
        self.publish_latency = Histogram(
            "policycast_publish_latency_seconds",
            "Seconds from an outbox row's creation (its change) to the broker acknowledging its publish.",
            buckets=PUBLISH_BUCKETS,
            registry=self.registry,
        )
        self.documents_published = Counter(
            "policycast_documents_published",
            "Documents from the outbox that the broker acknowledged (a superseded row is not published).",
            registry=self.registry,
        )
        states = Counter(
            "policycast_state_messages",
            "Agent state messages from the broker, by outcome (ingested, dropped: broke the contract).",
            ["outcome"],
            registry=self.registry,
        )
        self.states_ingested = states.labels(outcome="ingested")
        self.states_dropped = states.labels(outcome="dropped")
        self.convergence = ConvergenceObserver(engine, self.registry)
        self.registry.register(OutboxCollector(engine, cache_s=cache_s))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def state_message(self, ingested: bool) -> None:
        (self.states_ingested if ingested else self.states_dropped).inc()

    def published(self, latencies: list[float]) -> None:
        """Documents the broker acknowledged, each this many seconds after its outbox row was made."""
        for seconds in latencies:
            self.publish_latency.observe(max(0.0, seconds))
        self.documents_published.inc(len(latencies))

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the metrics are served on; None when they are not."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def serve(self, host: str, port: int) -> tuple[str, int] | None:
        """Serve /metrics on (host, port) on a thread of its own; the address, or None if it could
        not be bound (logged)."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("bridge metrics: cannot listen on %s:%d (%s); running without them", host, port, exc)
            return None
        address = self.address
        assert address is not None
        log.info("bridge metrics on http://%s:%d/metrics", *address)
        return address

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
