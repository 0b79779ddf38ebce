"""One running agent: heartbeats always, an MQTT session whenever the document says push.

SEPM clients heartbeat in both modes (push only adds the instant notification), so the `PullLoop` runs
from start to stop: it uploads status and, while the broker is unreachable, keeps the agent converging.
The `PushLoop` runs while the held document says push and the identity has broker credentials; the
runtime starts it when a document switches the mode to push and lets it end (offline state, clean
disconnect) when one switches it to pull. `core.transport`, which heartbeats report, says "push" exactly
while the MQTT session is up and "pull" otherwise.

Broker credentials are renewed by the manager (NATS JWTs expire): the heartbeat reports when the agent's
expire (`mqtt_expires_at`) and its answer may bring new ones (`mqtt`), as may a `credentials` command
on the cmd topic; both land in `AgentCore.adopt_credentials`, and the push loop reconnects with them.

When an applied document changed the CAs the agent trusts (`AgentCore` keeps them in the identity), the
runtime hands them to its manager client (`_follow_trust`): the next requests trust those; the push loop
takes them at its next connection.

The runtime also writes the agent's own events to its log spool: what became of each offered document
(`record_outcome`) and the manager going away and coming back (`record_reachability`).

Nothing here blocks or owns a thread: many runtimes share one event loop in the fleet simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from functools import partial
from typing import Any

from agent_stub import trust
from agent_stub.broker_account import push_blocker
from agent_stub.content import ContentClient, ContentSync
from agent_stub.core import AgentCore, ApplyOutcome, Outcome
from agent_stub.locator import FactsReader, LocationTracker
from agent_stub.log_spool import LogSpool, MemoryLogSpool
from agent_stub.log_uploads import PRIORITY_DELAY_S, LogUploads
from agent_stub.mqtt_link import LinkFactory, MqttLink
from agent_stub.pull import HeartbeatClient, PullLoop
from agent_stub.push import PushLoop
from agent_stub.state import CONTENT_DIR
from fabric_core.settings import AgentSettings
from fabric_core.wire import AgentCommand, EffectiveDocument, Mode, MqttCredentials

log = logging.getLogger(__name__)


class AgentRuntime:
    """Runs one agent's pull loop, and its push loop whenever push mode applies."""

    def __init__(
        self,
        core: AgentCore,
        client: HeartbeatClient,
        settings: AgentSettings,
        link_factory: LinkFactory = MqttLink,
        *,
        hostname: str | None = None,
        rng: random.Random | None = None,
        read_facts: FactsReader | None = None,
        spool: LogSpool | None = None,
        priority_delay_s: float = PRIORITY_DELAY_S,
    ) -> None:
        self.core = core
        self._client = client
        self._trust_used = tuple(core.identity.trusted_cas)
        """The CAs the client was built with (`policycast-agent run` builds it from the identity)."""
        self.pull = PullLoop(core, client, settings, hostname=hostname, rng=rng)
        self.location = LocationTracker(
            core,
            settings,
            manager_reachable=lambda: self.pull.manager_reachable,
            on_switch=self.pull.update_now,  # ask the manager for the new location's document at once
            read_facts=read_facts,
        )
        self.pull.wanted_location = lambda: self.location.wanted
        # The agent's log (its own events, `policycast-agent log`) rides on heartbeats; security
        # entries bring the next heartbeat forward.
        self.spool = spool if spool is not None else MemoryLogSpool()
        self.logs = LogUploads(self.spool, self.pull.update_now, priority_delay_s=priority_delay_s)
        self.pull.uploads = self.logs
        self.pull.on_reachability = partial(record_reachability, self.spool)
        self.push = PushLoop(
            core, link_factory, settings, self._on_command, on_connection=self._on_connection, rng=rng
        )
        self._stop: asyncio.Event | None = None
        self._push_task: asyncio.Task[None] | None = None
        self._blocker: str | None = None
        self._announced = False
        # Content downloads need a client that fetches manifests and blobs (`ManagerClient`); the
        # heartbeat-only clients of the fleet simulator and of tests have none: no content there.
        self.content: ContentSync | None = None
        if isinstance(client, ContentClient):
            self.content = ContentSync(
                core,
                client,
                settings.state_dir / CONTENT_DIR,
                rng=rng,
                retry_min_s=settings.retry_min_s,
                retry_max_s=settings.retry_max_s,
            )
            self.pull.status_sources.append(self.content.status)

    @property
    def transport(self) -> Mode:
        return self.core.transport

    def update_now(self) -> None:
        """Heartbeat at once ("Update policy now"). Safe from a signal handler."""
        self.pull.update_now()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; the push session, if any, ends cleanly before this returns."""
        self._stop = stop
        self.core.transport = "pull"
        detach = self.core.add_listener(self._on_applied)
        detach_credentials = self.core.add_credentials_listener(self._on_credentials)
        detach_events = self.core.add_outcome_listener(partial(record_outcome, self.spool))
        uploading = asyncio.get_running_loop().create_task(self.logs.run(stop))
        self._announced = False
        self._reconcile()
        locating = asyncio.get_running_loop().create_task(self.location.run(stop))
        if self.content is not None:
            self.content.schedule()  # the held document's content, if a download was cut short
        try:
            await self.pull.run(stop)
        finally:
            locating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await locating
            detach()
            detach_credentials()
            detach_events()
            uploading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await uploading
            await self._end_push(stop)
            if self.content is not None:
                await self.content.aclose()
            self._stop = None
            self.core.record_stopped()

    # --- push on and off ---------------------------------------------------------------------------

    def _on_applied(self, doc: EffectiveDocument) -> None:
        self._follow_trust()
        self._reconcile()
        if self.content is not None:
            self.content.schedule(doc)
        self.location.evaluate()  # the document may bring other locations or conditions

    def _on_credentials(self, credentials: MqttCredentials) -> None:
        self._reconcile()  # credentials may be what push mode lacked

    def _follow_trust(self) -> None:
        """Switch the manager client to the CAs the identity holds now, if the document changed them."""
        held = tuple(self.core.identity.trusted_cas)
        if held == self._trust_used:
            return
        self._trust_used = held
        if isinstance(self._client, trust.TrustingClient):
            self._client.use_ssl_context(trust.context_for(held))

    def _reconcile(self) -> None:
        """Start the push loop if push mode applies and it is not running (it stops by itself)."""
        stop = self._stop
        if stop is None or stop.is_set():
            return
        blocker = push_blocker(self.core)
        if blocker != self._blocker or not self._announced:
            log.info("push mode %s", "on" if blocker is None else f"off: {blocker}")
            self._blocker, self._announced = blocker, True
        if blocker is None and (self._push_task is None or self._push_task.done()):
            task = asyncio.get_running_loop().create_task(
                self.push.run(stop), name=f"push-{self.core.identity.agent_id}"
            )
            task.add_done_callback(self._push_ended)
            self._push_task = task

    def _push_ended(self, task: asyncio.Task[None]) -> None:
        if self._stop is None:
            return  # the runtime has stopped (this callback can run after it): the status says so already
        self.core.transport = "pull"
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # Not restarted at once (it could fail again at once); the next document restarts it.
            log.error("the push loop failed; heartbeats go on", exc_info=exc)
            return
        # The document may have switched back to push while the session was closing.
        self._reconcile()

    async def _end_push(self, stop: asyncio.Event) -> None:
        task = self._push_task
        if task is None or task.done():
            return
        if not stop.is_set():  # the pull loop ended without a stop (a bug): do not leave push running
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    def _on_connection(self, up: bool) -> None:
        self.core.transport = "push" if up else "pull"
        log.info("transport: %s", self.core.transport)
        if up:
            # Tell the manager at once if its last word from us says otherwise: the heartbeat that
            # reported the document (sent while the session was still coming up, so saying pull) would
            # stand for a whole interval. After a broker restart most agents last said push, and stay
            # quiet: a fleet coming back must not all heartbeat at once (benchmark 4).
            # Not when the session drops: the will says so, and a broker outage must not make a whole
            # fleet heartbeat at the same moment.
            self.pull.report_transport()

    def _on_command(self, command: AgentCommand) -> None:
        if command.command == "update_now":
            self.update_now()
        elif command.command == "credentials" and command.mqtt is not None:
            self.core.adopt_credentials(command.mqtt, source="command")


# --- the agent's own events, in its log ---------------------------------------------------------------


def record_outcome(spool: LogSpool, outcome: ApplyOutcome) -> None:
    """Log an offered document's fate: applied (info), rejected (security), not stored (error).

    Stale offers are routine (retained MQTT messages, repeated heartbeats) and not logged.
    """
    if outcome.status is Outcome.APPLIED and outcome.document is not None:
        doc = outcome.document
        data = {"serial": doc.serial, "source": outcome.source, "group_id": doc.group_id}
        data["location_id"] = doc.location_id
        _record(spool, "info", f"applied serial {doc.serial} from {outcome.source}", "policy", data)
    elif outcome.status is Outcome.REJECTED:
        reason = outcome.reason or "rejected"
        # A document that failed verification (signature, form, group) is forged or broken in transit:
        # a security event. One the agent could not store is the host's problem, not an attack.
        local = reason.startswith("not stored")
        level = "error" if local else "security"
        data = {"source": outcome.source, "reason": reason, "serial": outcome.serial}
        _record(spool, level, f"rejected a document from {outcome.source}: {reason}", "security", data)


def record_reachability(spool: LogSpool, reachable: bool, detail: str) -> None:
    """Log that the manager became unreachable (warning) or reachable again (info)."""
    _record(spool, "info" if reachable else "warning", detail, "manager", {"reachable": reachable})


def _record(spool: LogSpool, level: str, message: str, category: str, data: dict[str, Any]) -> None:
    try:
        spool.append(level, message, category=category, data=data)
    except (OSError, ValueError) as exc:
        # The agent's work goes on without its log rather than stop for it.
        log.warning("could not log %r to the spool: %s", message, exc)
