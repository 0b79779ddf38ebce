"""Pull mode: heartbeat the manager, apply what it hands back, sleep, repeat.

The first heartbeat goes out at once; then the loop sleeps as long as the manager says
(`next_heartbeat_s`, which already carries the manager's jitter). When the manager cannot be reached or
refuses the agent, the loop backs off exponentially with full jitter, never longer than one heartbeat
interval, while the last good document stays in force (it is already on disk). `update_now()` cuts any
sleep short ("Update policy now").

The heartbeat's `status` is sent only when the manager may not hold it (docs/protocol.md): on the first
heartbeat after start (the agent cannot know what the manager holds), whenever it differs from the
status of the last heartbeat answered 2xx, and after any heartbeat that failed (it may or may not have
arrived). Otherwise it is left out, and the manager keeps the one it holds.

An agent whose broker credentials expire (NATS JWTs) says when in every heartbeat (`mqtt_expires_at`),
whatever its mode (a switch to push then finds good ones); an answer's `mqtt` replaces them
(`AgentCore.adopt_credentials`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import random
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from agent_stub import AGENT_VERSION
from agent_stub.core import AgentCore
from agent_stub.errors import ManagerRejected, ManagerUnreachable
from fabric_core.settings import AgentSettings
from fabric_core.wire import HEARTBEAT_MAX_S, HeartbeatRequest, HeartbeatResponse, LogBatch, Mode

log = logging.getLogger(__name__)

_MAX_DOUBLINGS = 32  # 2**32 * retry_min_s is beyond any cap; avoids float overflow after a long outage


class HeartbeatClient(Protocol):
    """What the loop needs from a transport (`ManagerClient`, or a fake in the simulator)."""

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse: ...


class Uploads(Protocol):
    """Where heartbeats take their log batch from (the agent's spool)."""

    def next_batch(self) -> LogBatch | None:
        """The batch to send now; the same batch (same id) until it is acknowledged."""
        ...

    def acknowledge(self, batch_id: str) -> None:
        """The manager stored the batch: forget it."""
        ...

    def refused(self, batch_id: str) -> None:
        """The manager refused the batch as too large (413) and stored none of it: make it smaller."""
        ...


StatusSource = Callable[[], dict[str, Any]]
"""Adds keys to the heartbeat's `status` (e.g. the content revisions held)."""

ReachabilityListener = Callable[[bool, str], None]
"""Told when the manager stops answering (False, the error) and answers again (True, a summary)."""


class PullLoop:
    """Drives one agent's heartbeats; many can share one event loop.

    Extension points, for the runtime to plug other parts in: `uploads` (log batches ride on heartbeats),
    `status_sources` (what the agent reports besides hostname and version), and `wanted_location`
    (the location the agent chose; None: the one it holds).
    """

    def __init__(
        self,
        core: AgentCore,
        client: HeartbeatClient,
        settings: AgentSettings,
        *,
        hostname: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._core = core
        self._client = client
        self._retry_min_s = settings.retry_min_s
        self._retry_max_s = settings.retry_max_s
        self._hostname = hostname or core.identity.hostname or socket.gethostname()
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._failures = 0
        self._last_error: str | None = None
        self._acknowledged_status: dict[str, Any] | None = None
        """The status the manager holds for sure: that of the last heartbeat answered 2xx (sent, or
        left out as unchanged); None when unknown (before the first answer, after any failure)."""
        self._reported_mode: Mode | None = None
        """The transport the manager holds for sure: that of the last heartbeat answered 2xx."""
        self._in_flight = False
        self.heartbeats = 0
        """Successful heartbeats so far (for tests and the simulator's counters)."""
        self.uploads: Uploads | None = None
        self.status_sources: list[StatusSource] = []
        self.wanted_location: Callable[[], int | None] | None = None
        self.on_reachability: ReachabilityListener | None = None

    @property
    def manager_reachable(self) -> bool:
        """Whether the last heartbeat got an answer (true until the first one says otherwise)."""
        return self._failures == 0

    def update_now(self) -> None:
        """Heartbeat at once instead of finishing the current sleep. Safe from a signal handler."""
        self._wake.set()

    def report_transport(self) -> None:
        """Heartbeat at once unless the manager already holds the agent's transport.

        A push session coming up must reach the operator's view, but after a broker restart a whole
        fleet comes back within seconds: most agents last told the manager "push" (their sessions were
        only briefly down) and need not heartbeat at all. A heartbeat in flight may carry the old
        transport, so it counts as unknown.
        """
        if self._in_flight or self._reported_mode != self._core.transport:
            self.update_now()

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat until `stop` is set; a heartbeat in flight is abandoned when it is."""
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                beat = asyncio.ensure_future(self.heartbeat_once())
                await asyncio.wait({beat, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not beat.done():
                    beat.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beat
                    break
                await self._sleep(beat.result(), stopped)
        finally:
            stopped.cancel()

    async def heartbeat_once(self) -> float:
        """One heartbeat; returns how long to wait before the next one."""
        # Cleared before sending: a request for an update made while this one is in flight still counts.
        self._wake.clear()
        status = self._status()
        request = self._request(status)
        # Unknown until this one is answered: a failure, or a cancellation in flight, means resending.
        self._acknowledged_status = None
        self._reported_mode = None
        self._in_flight = True
        try:
            response = await self._client.heartbeat(request)
        except ManagerUnreachable as exc:
            return self._failed(f"manager unreachable: {exc}")
        except ManagerRejected as exc:
            if exc.status == 413 and request.logs is not None and self.uploads is not None:
                # Nothing was stored; without a smaller batch, every later heartbeat would fail the same.
                self.uploads.refused(request.logs.batch_id)
            if exc.unauthorized:
                return self._failed(
                    f"manager refused the agent's credentials ({exc}); "
                    "the agent may have been revoked: re-enrol with `policycast-agent enroll --force`",
                    level=logging.ERROR,
                )
            return self._failed(f"manager rejected the heartbeat: {exc}", level=logging.ERROR)
        except Exception as exc:
            # A bug must not end the loop: the agent keeps enforcing and keeps trying.
            log.exception("heartbeat failed unexpectedly")
            return self._failed(f"unexpected error: {exc!r}", level=logging.DEBUG)
        finally:
            self._in_flight = False
        if request.logs is not None and self.uploads is not None:
            self.uploads.acknowledge(request.logs.batch_id)  # stored once, even if this was a retry
        self._acknowledged_status = status
        self._reported_mode = request.mode
        return self._succeeded(response)

    # --- internals ---------------------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        """The agent's status now; a deep copy, so that a source changing its own dicts later cannot
        change what is remembered as acknowledged."""
        status: dict[str, Any] = {"hostname": self._hostname, "agent_version": AGENT_VERSION}
        for source in self.status_sources:
            status.update(source())
        return copy.deepcopy(status)

    def _request(self, status: dict[str, Any]) -> HeartbeatRequest:
        wanted = self.wanted_location() if self.wanted_location is not None else None
        return HeartbeatRequest(
            serial=self._core.serial,
            location_id=wanted if wanted is not None else self._core.location_id,
            mode=self._core.transport,
            # Left out when the manager holds it already: absent means unchanged.
            status=None if status == self._acknowledged_status else status,
            logs=self.uploads.next_batch() if self.uploads is not None else None,
            mqtt_expires_at=_expires_at(self._core),
        )

    def _succeeded(self, response: HeartbeatResponse) -> float:
        if self._failures:
            log.info("manager reachable again after %d failed attempt(s)", self._failures)
            self._reachability(True, f"manager reachable again after {self._failures} failed attempt(s)")
        self._failures = 0
        self._last_error = None
        self.heartbeats += 1
        applied = False
        if response.changed and response.config is not None:
            applied = self._core.offer(response.config.model_dump(), source="heartbeat").applied
        elif response.changed:
            log.debug("manager reports serial %d without a document; nothing to apply", response.serial)
        if response.mqtt is not None:
            # After the document: a group move's document and its re-scoped credentials come together,
            # and the push loop then reconnects once, subscribed to the new group.
            self._core.adopt_credentials(response.mqtt, source="heartbeat")
        # Clamped so that a broken answer (0, negative, huge) can neither spin nor silence the agent.
        delay = min(max(float(response.next_heartbeat_s), self._retry_min_s), float(HEARTBEAT_MAX_S))
        if applied:
            # Report the new serial at once rather than a whole interval later: the operator sees the
            # change land, and it costs one small request per change, not per heartbeat.
            delay = 0.0
        now = datetime.now(UTC)
        self._core.record_heartbeat(at=now, next_at=now + timedelta(seconds=delay))
        return delay

    def _failed(self, error: str, *, level: int = logging.WARNING) -> float:
        self._failures += 1
        if self._failures == 1:
            self._reachability(False, error)
        delay = self._backoff_s()
        # Said once per distinct error, not every retry, so a long outage does not flood the log.
        log.log(level if error != self._last_error else logging.DEBUG, "%s; retrying in %.1f s", error, delay)
        self._last_error = error
        self._core.record_error(error=error, next_at=datetime.now(UTC) + timedelta(seconds=delay))
        return delay

    def _reachability(self, reachable: bool, detail: str) -> None:
        if self.on_reachability is None:
            return
        try:
            self.on_reachability(reachable, detail)
        except Exception:
            log.exception("a reachability listener failed")  # must not end the loop

    def _backoff_s(self) -> float:
        """Exponential back-off with full jitter, between retry_min_s and min(retry_max_s, heartbeat_s)."""
        cap = max(self._retry_min_s, min(self._retry_max_s, float(self._core.heartbeat_s)))
        doublings = min(self._failures - 1, _MAX_DOUBLINGS)
        ceiling = min(cap, self._retry_min_s * 2.0**doublings)
        return self._rng.uniform(self._retry_min_s, ceiling)

    async def _sleep(self, delay: float, stopped: asyncio.Future[Any]) -> None:
        """Wait `delay` seconds, or less if stopped or asked to update now."""
        if self._wake.is_set():
            return
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({woken, stopped}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()


def _expires_at(core: AgentCore) -> int | None:
    """When the agent's broker password expires, in Unix seconds (None: it never does, or no broker)."""
    credentials = core.identity.mqtt
    if credentials is None or credentials.expires_at is None:
        return None
    expires_at = credentials.expires_at
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    return max(0, int(expires_at.timestamp()))
