"""`policycast bridge`: ingest agent state, and (while holding the lease) provision and relay.

One round: flush ingested state; renew the lease; if held, reconcile broker accounts (when something
changed), then relay documents and commands, and every `anti_entropy_s` repair the push agents a lost
message left behind and send again the commands nobody acted on (`broker_bridge.anti_entropy`). A
broker or database that is away is retried with exponential back-off and full jitter; the outbox
keeps what waits meanwhile. A broker that comes back ends the back-off at once.

While it runs, a bridge serves its Prometheus metrics on `bridge_metrics_port` (`broker_bridge.metrics`).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
import uuid

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from broker_bridge import lease
from broker_bridge.anti_entropy import AntiEntropy
from broker_bridge.broker import BrokerLink
from broker_bridge.engine import BrokerEngine
from broker_bridge.errors import BrokerError
from broker_bridge.ingest import StateIngest
from broker_bridge.metrics import BridgeMetrics
from broker_bridge.reconcile import reconcile_accounts
from broker_bridge.relay import relay_commands, relay_outbox, republish_current, resend_commands
from fabric_core.settings import Settings
from fabric_core.tls import client_context, manager_trust
from fabric_core.topics import all_states_filter
from manager_db.counters import read_counters_outside

log = logging.getLogger(__name__)

LEASE_TTL_S = 10.0
RECONCILE_EVERY_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 30.0


def bridge_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


BRIDGE_CLIENT_ID_PREFIX = "policycast-bridge-"


def bridge_client_id() -> str:
    """An MQTT client id nobody can guess (agents' ids are bound to their accounts; this one is not,
    so it must not be takeable by knowing it)."""
    return f"{BRIDGE_CLIENT_ID_PREFIX}{secrets.token_hex(16)}"


def connect_link(settings: Settings, broker: BrokerEngine, *, client_id: str | None = None) -> BrokerLink:
    """The bridge's link to the broker, with its account, speaking the engine's MQTT version and
    failing over among every node of `mqtt_url` (not connected yet: `start` it). Over TLS it trusts
    only the manager's CA (`fabric_core.tls.manager_trust`)."""
    username, password = broker.bridge_credentials()
    addresses = settings.mqtt_addresses
    context = client_context(manager_trust(settings)) if any(a.tls for a in addresses) else None
    return BrokerLink(
        addresses,
        username=username,
        password=password,
        client_id=client_id or bridge_client_id(),
        ssl_context=context,
        protocol=broker.delivery.protocol,
    )


class Bridge:
    def __init__(self, *, settings: Settings, engine: Engine, broker: BrokerEngine, link: BrokerLink) -> None:
        self.settings = settings
        self.engine = engine
        self.broker = broker
        self.link = link
        self.holder = bridge_holder()
        self.metrics = BridgeMetrics(engine, cache_s=settings.metrics_cache_s)
        self.ingest = StateIngest(
            prefix=settings.mqtt_prefix,
            on_advances=self.metrics.convergence.observe,
            on_message=self.metrics.state_message,
        )
        self._lease_until = 0.0
        self._reconciled_generation = -1
        self._reconciled_at = 0.0
        self._sessions_seen = 0
        self.published = 0
        self.repair = self._new_repair()
        """What the relay published when, and which agents lag (`broker_bridge.anti_entropy`)."""

    def run(self, stop: threading.Event) -> None:
        self.link.subscribe(all_states_filter(self.settings.mqtt_prefix), self.ingest.handle)
        if self.settings.bridge_metrics_port is not None:
            self.metrics.serve(self.settings.bridge_metrics_host, self.settings.bridge_metrics_port)
        failures = 0
        try:
            while not stop.is_set():
                try:
                    busy = self.round()
                except (BrokerError, OperationalError) as exc:
                    failures += 1
                    delay = random.uniform(0, min(MAX_BACKOFF_S, 0.5 * 2**failures))
                    log.warning("bridge round failed (%s); retrying in %.1fs", exc, delay)
                    self._pause(delay, stop)
                    continue
                if failures:
                    log.info("bridge working again after %d failed round(s)", failures)
                    failures = 0
                if not busy:
                    stop.wait(self.settings.bridge_poll_s)
        finally:
            self._release()
            self.metrics.stop()

    def _pause(self, delay: float, stop: threading.Event) -> None:
        """Back off after a failed round, but resume as soon as a lost broker connection is back.

        The link reconnects by itself; the documents published while the broker was away wait for the
        next round, so sleeping out a grown back-off here would keep the whole fleet on old serials.
        """
        deadline = time.monotonic() + delay
        was_down = not self.link.connected.is_set()
        while not stop.is_set() and (remaining := deadline - time.monotonic()) > 0:
            if was_down and self.link.connected.wait(min(remaining, 0.1)):
                return
            if not was_down:
                stop.wait(remaining)

    def round(self) -> bool:
        """One pass; True if there may be more work right away."""
        self.ingest.flush(self.engine)
        if not self._hold_lease():
            return False
        try:
            self._reconcile_if_needed()
        except BrokerError as exc:
            # Broker access (a NATS revocation push, a dynsec command) waits for the next round; it
            # must not hold back the documents and commands, which go over the MQTT link.
            log.warning("reconciling broker access failed (%s); relaying anyway", exc)
        batch, prefix = self.settings.bridge_batch, self.settings.mqtt_prefix
        sessions = self.link.sessions
        if sessions != self._sessions_seen:
            topics = republish_current(self.engine, self.link, prefix=prefix, timeout=PUBLISH_TIMEOUT_S)
            self.repair.note_published(topics)
            log.info("broker (re)connected: republished %d current document(s)", len(topics))
            self._sessions_seen = sessions
        documents = relay_outbox(
            self.engine,
            self.link,
            prefix=prefix,
            batch=batch,
            timeout=PUBLISH_TIMEOUT_S,
            on_published=self.repair.note_published,
            on_acknowledged=self.metrics.published,
        )
        commands = relay_commands(
            self.engine, self.link, prefix=prefix, batch=batch, timeout=PUBLISH_TIMEOUT_S
        )
        if self.repair.due():
            self.repair.run_round(self.engine, self.link)
            commands += resend_commands(
                self.engine,
                self.link,
                prefix=prefix,
                after_s=self.settings.command_resend_s,
                timeout=PUBLISH_TIMEOUT_S,
            )
        self.published += documents + commands
        return documents >= batch or commands >= batch

    def _new_repair(self) -> AntiEntropy:
        settings = self.settings
        return AntiEntropy(
            prefix=settings.mqtt_prefix,
            interval_s=settings.anti_entropy_s,
            grace_s=settings.anti_entropy_grace_s,
            republish_all_s=settings.republish_all_s,
        )

    def _hold_lease(self) -> bool:
        now = time.monotonic()
        if now < self._lease_until - LEASE_TTL_S / 2:
            return True  # renewed recently enough: no write this round
        if lease.acquire(self.engine, holder=self.holder, ttl_s=LEASE_TTL_S):
            if self._lease_until < now:
                log.info("bridge %s holds the relay lease", self.holder)
                self.repair = self._new_repair()  # what another holder published, this one did not see
            self._lease_until = now + LEASE_TTL_S
            self.broker.watch(until=self._lease_until)  # NATS: the takeover guard, while the lease holds
            return True
        self._lease_until = 0.0
        return False

    def _reconcile_if_needed(self) -> None:
        _, generation = read_counters_outside(self.engine)
        stale = time.monotonic() - self._reconciled_at > RECONCILE_EVERY_S
        if generation == self._reconciled_generation and not stale:
            return
        for _ in range(1000):  # bounded: a fleet-wide change is done in batches, never in an endless loop
            if not reconcile_accounts(self.engine, self.link, broker=self.broker):
                break
        self._reconciled_generation = generation
        self._reconciled_at = time.monotonic()

    def _release(self) -> None:
        try:
            self.broker.stop_watching()
            self.ingest.flush(self.engine)
            lease.release(self.engine, holder=self.holder)
        except OperationalError as exc:
            log.warning("could not release the lease cleanly: %s", exc)


class BridgeThread:
    """A `Bridge` on a thread of its own, for `policycast up` and tests (`policycast bridge` uses the
    main thread)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bridge", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.bridge.run(self.stop_event)
        except BaseException as exc:  # kept for whoever started the thread to report
            self.error = exc
            log.exception("the bridge stopped on an unexpected error")

    def start(self) -> BridgeThread:
        self.bridge.link.start()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
        self.bridge.link.close()
