"""Push mode: one MQTT session while the agent's document says push (DESIGN.md §1, §4).

While the held document says `push` and the identity has broker credentials, `PushLoop.run` keeps an
MQTT 5 session with a retained last will saying offline, delivered as the broker engine asks at
enrolment (`MqttCredentials.delivery`): by default a persistent session (clean start off, session expiry
`mqtt_session_expiry_s`) subscribed at QoS 1; with `persistent_session` false a clean one (clean start,
session expiry 0), and its subscriptions at `delivery.qos` (`link_options`):

- it subscribes to exactly the config topic of the (group, location) it holds, and to its cmd topic.
  When a document from any source changes the (group, location), it subscribes to the new topic first,
  then leaves the old one, so that no change can slip through a gap;
- it hands config messages to `AgentCore.offer`, which checks signature, group and serial, but only those
  on the topic of the document held. A retained document of a location the agent has left must not move
  it back (the per-location anti-rollback rule accepts a document equal to that location's high-water
  mark), so messages on any other config topic are dropped, and that topic is left: it is a subscription
  from an earlier session or location;
- it forwards valid commands to `on_command`; malformed ones are logged and dropped;
- it publishes its state, retained, after connecting and after each applied document;
- it reconnects with exponential back-off and full jitter, between reconnect_min_s and reconnect_max_s;
- over mqtts:// it trusts exactly the identity's CAs (`agent_stub.trust`); when a document changed
  them, the next connection is a new link that trusts the new ones.

When the document switches to pull, the loop publishes an offline state, ends its broker session (no
point queueing messages for an agent that no longer listens) and returns. When stopped, it publishes an
offline state and disconnects cleanly but keeps a persistent session, so that what arrives meanwhile
waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from agent_stub import trust
from agent_stub.core import AgentCore
from agent_stub.errors import LinkError, LinkRefused
from agent_stub.mqtt_link import Link, LinkFactory, LinkOptions, Message
from agent_stub.state import Identity
from fabric_core.errors import InvalidTopic, PolicycastError
from fabric_core.settings import AgentSettings, MqttAddress
from fabric_core.topics import (
    DEFAULT_PREFIX,
    ConfigTopic,
    check_prefix,
    cmd_topic,
    config_topic,
    parse_topic,
    state_topic,
)
from fabric_core.wire import AgentCommand, AgentStateReport, EffectiveDocument, Mode, MqttDelivery

log = logging.getLogger(__name__)

CommandHandler = Callable[[AgentCommand], None]
ConnectionHandler = Callable[[bool], None]
"""Told True when the session is up (subscribed), False when it is down."""

_RECENT_COMMANDS = 32  # QoS 1 may deliver a command twice; remember enough ids to act once
_MAX_DOUBLINGS = 32


def topic_prefix(identity: Identity) -> str:
    """The topic prefix of the agent's broker, as enrolment gave it (or set by hand), else the default."""
    credentials = identity.mqtt
    if credentials is None:
        return DEFAULT_PREFIX
    return credentials.prefix or credentials.mqtt_prefix or DEFAULT_PREFIX


def push_blocker(core: AgentCore) -> str | None:
    """Why push mode cannot run now, or None when it can."""
    if core.mode != "push":
        return "the document says pull" if core.document else "no document yet"
    credentials = core.identity.mqtt
    if credentials is None:
        return "no broker credentials (the manager offered no push at enrolment)"
    try:
        MqttAddress.parse(credentials.url)
        check_prefix(topic_prefix(core.identity))
    except (ValueError, PolicycastError) as exc:
        return f"unusable broker settings: {exc}"
    return None


def backoff_s(failures: int, low: float, high: float, rng: random.Random) -> float:
    """Exponential back-off with full jitter: uniform in [low, min(high, low * 2**(failures - 1))].

    The floor is `low` rather than 0 so that a broker that refuses at once is never hammered.
    """
    doublings = min(max(failures - 1, 0), _MAX_DOUBLINGS)
    ceiling = max(low, min(high, low * 2.0**doublings))
    return rng.uniform(low, ceiling)


def state_report(core: AgentCore, *, online: bool, mode: Mode | None) -> bytes:
    """The retained payload of the agent's state topic."""
    report = AgentStateReport(
        agent_id=core.identity.agent_id,
        online=online,
        serial=core.serial,
        group_id=core.identity.group_id,
        location_id=core.location_id,
        mode=mode,
        at=datetime.now(UTC),
    )
    return report.model_dump_json(exclude_none=True).encode()


def will_payload(agent_id: str) -> bytes:
    """The last will: `{agent_id, online: false}`, published by the broker if the agent vanishes."""
    return AgentStateReport(agent_id=agent_id, online=False).model_dump_json(exclude_none=True).encode()


def delivery_of(identity: Identity) -> MqttDelivery:
    """How the agent's broker engine delivers: the identity's, else (no credentials) the default."""
    return identity.mqtt.delivery if identity.mqtt is not None else MqttDelivery()


def link_options(identity: Identity, settings: AgentSettings, *, will: Message | None = None) -> LinkOptions:
    """The options of the agent's MQTT session: its broker account, and the session its engine asks for.

    A persistent session (the default) starts without clean start and outlives a disconnection by
    `mqtt_session_expiry_s`; a clean one (`persistent_session` false) starts clean and ends with the
    connection (session expiry 0). Over mqtts:// the link trusts the identity's CAs only (none held:
    the system store, as before agents pinned a CA).
    """
    credentials = identity.mqtt
    if credentials is None:  # pragma: no cover - callers check it (`push_blocker`)
        raise RuntimeError("push mode without broker credentials")
    persistent = credentials.delivery.persistent_session
    return LinkOptions(
        address=MqttAddress.parse(credentials.url),
        client_id=identity.agent_id,
        username=credentials.username,
        password=credentials.password,
        keepalive_s=settings.mqtt_keepalive_s,
        session_expiry_s=settings.mqtt_session_expiry_s if persistent else 0,
        clean_start=not persistent,
        will=will,
        timeout_s=settings.request_timeout_s,
        ssl_context=trust.context_for(identity.trusted_cas),
    )


class PushLoop:
    """Drives one agent's MQTT session; many can share one event loop. `run` may be called again."""

    def __init__(
        self,
        core: AgentCore,
        link_factory: LinkFactory,
        settings: AgentSettings,
        on_command: CommandHandler,
        *,
        on_connection: ConnectionHandler | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._core = core
        self._link_factory = link_factory
        self._settings = settings
        self._on_command = on_command
        self._on_connection = on_connection
        self._rng = rng or random.Random()
        self._link: Link | None = None
        self._link_trust: tuple[str, ...] = ()
        """The CAs the link was made to trust: another set held now means a new link."""
        self._changed = asyncio.Event()
        self._session_up = False
        self._subscribed: str | None = None
        """The config topic subscribed to (in this session, or left in the broker's session)."""
        self._stale: set[str] = set()
        """Config topics to leave."""
        self._reported: tuple[int, int, int | None] | None = None
        self._recent_commands: deque[str] = deque(maxlen=_RECENT_COMMANDS)
        self._failures = 0
        self._last_error: str | None = None
        self.sessions = 0
        """Sessions established so far (for tests and the simulator's counters)."""

    @property
    def connected(self) -> bool:
        """True while the session is up: connected and subscribed."""
        return self._session_up and self._link is not None and self._link.connected

    @property
    def wanted(self) -> bool:
        return push_blocker(self._core) is None

    @property
    def link(self) -> Link | None:
        return self._link

    # --- the loop ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a session until `stop` is set or the document no longer says push."""
        detach = self._core.add_listener(self._on_applied)
        stopped = asyncio.ensure_future(stop.wait())
        self._failures = 0
        try:
            while not stopped.done() and self.wanted:
                failure = await self._session(stopped)
                if failure is not None and not stopped.done() and self.wanted:
                    await self._pause(self._failed(*failure), stopped)
        finally:
            detach()
            stopped.cancel()
            # Cancelled or stopped: keep the broker session for the next run; switched to pull: end it.
            await self._leave(switched_to_pull=not stop.is_set() and not self.wanted)

    async def _session(self, stopped: asyncio.Future[Any]) -> tuple[str, int] | None:
        """One connection, from connect to its end; returns why it ended badly (and a log level)."""
        link = self._link
        if link is None or self._link_trust != tuple(self._core.identity.trusted_cas):
            if link is not None and link.connected:
                link.abort()  # sessions end before the next begins: this only makes sure
            link = self._new_link()
        error: str | None = None
        level = logging.WARNING
        try:
            # Raced against stop: connecting to a silent broker must not hold up a shutdown.
            if not await _unless_stopped(self._connect(link), stopped):
                return None
            await self._follow(link, stopped)
        except LinkRefused as exc:
            # Credentials or ACL: not going to fix itself soon, and the operator must hear of it.
            error, level = f"push session refused: {exc}", logging.ERROR
        except LinkError as exc:
            error = f"push session: {exc}"
        except Exception as exc:
            # A bug must not end push mode for good: log it, drop the connection, try again later.
            log.exception("push session failed unexpectedly")
            error = f"push session: unexpected error: {exc!r}"
        finally:
            self._set_session(False)
        if error is None:
            return None
        if link.connected:
            link.abort()  # e.g. a refused subscription: start again from a fresh connection
        return error, level

    async def _connect(self, link: Link) -> None:
        await link.connect()
        await self._open(link)

    async def _open(self, link: Link) -> None:
        """Subscribe and report, on a fresh connection."""
        # Subscribe again even when the broker kept the session: a subscription re-sends the retained
        # document, so the agent converges even if the broker lost queued messages.
        if self._subscribed is not None:
            self._stale.add(self._subscribed)
            self._subscribed = None
        self._reported = None
        self._changed.clear()
        await link.subscribe(self._cmd_topic, qos=self._qos)
        await self._follow_subscription(link)
        if self._failures:
            log.info("push session up again after %d failed attempt(s)", self._failures)
        self._failures = 0
        self._last_error = None
        self.sessions += 1
        # Up before the report goes out: whoever sees the agent online sees it on push.
        self._set_session(True)
        await self._report_if_changed(link)

    async def _follow(self, link: Link, stopped: asyncio.Future[Any]) -> None:
        """Keep the subscription and the reported state in step with the document held."""
        while True:
            await _first_of(stopped, self._changed, link.disconnected)
            if stopped.done():
                return
            if not link.connected:
                raise _Lost("the connection to the broker was lost")
            if not self.wanted:
                return
            await self._sync(link)

    async def _sync(self, link: Link) -> None:
        """Move the subscription to the held (group, location) and report what the agent holds."""
        self._changed.clear()  # first: a change made while this runs wakes the next round
        await self._follow_subscription(link)
        await self._report_if_changed(link)

    async def _follow_subscription(self, link: Link) -> None:
        want = self._held_topic()
        if want is not None and want != self._subscribed:
            await link.subscribe(want, qos=self._qos)
            if self._subscribed is not None:
                self._stale.add(self._subscribed)
            log.info("push: subscribed to %s", want)
            self._subscribed = want
        self._stale.discard(want or "")
        for topic in sorted(self._stale):
            try:
                await link.unsubscribe(topic)
                log.info("push: left %s", topic)
            except LinkRefused as exc:
                # Nothing more to do about it: the agent ignores what still arrives there anyway.
                log.warning("push: could not leave %s: %s", topic, exc)
            self._stale.discard(topic)

    async def _report_if_changed(self, link: Link) -> None:
        held = (self._core.serial, self._core.identity.group_id, self._core.location_id)
        if held != self._reported:
            await self._report(link)
            self._reported = held

    async def _report(self, link: Link) -> None:
        payload = state_report(self._core, online=True, mode="push")
        try:
            await link.publish(Message(self._state_topic, payload, qos=1, retain=True))
        except LinkRefused as exc:
            # Presence is for operators; documents still flow, so a denied report does not end the session.
            log.error("push: the broker refused the state report (check the agent's ACL): %s", exc)

    async def _leave(self, *, switched_to_pull: bool) -> None:
        """Say offline and disconnect cleanly; end the broker session too when push mode is over."""
        self._set_session(False)
        link, self._link = self._link, None
        if link is None:
            return
        try:
            # One bound for both steps, so that a hung broker delays a shutdown by one timeout at most.
            async with asyncio.timeout(self._settings.request_timeout_s):
                if link.connected:
                    mode: Mode | None = "pull" if switched_to_pull else None
                    payload = state_report(self._core, online=False, mode=mode)
                    await link.publish(Message(self._state_topic, payload, qos=1, retain=True))
                await link.close(end_session=switched_to_pull)
        except (LinkError, TimeoutError) as exc:
            log.info("push: could not leave cleanly (%s); dropping the connection", exc or "timed out")
            link.abort()
        if switched_to_pull:  # the broker dropped the session, and its subscriptions with it
            self._subscribed = None
            self._stale.clear()

    async def _pause(self, delay: float, stopped: asyncio.Future[Any]) -> None:
        """Wait `delay` before reconnecting; end early if stopped or push mode is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while not stopped.done() and self.wanted:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            await _first_of(stopped, self._changed, limit_s=remaining)

    def _failed(self, error: str, level: int = logging.WARNING) -> float:
        self._failures += 1
        delay = backoff_s(
            self._failures, self._settings.reconnect_min_s, self._settings.reconnect_max_s, self._rng
        )
        # Said once per distinct error, not every retry, so a long outage does not flood the log.
        level = level if error != self._last_error else logging.DEBUG
        log.log(level, "%s; reconnecting in %.1f s (heartbeats go on meanwhile)", error, delay)
        self._last_error = error
        return delay

    def _set_session(self, up: bool) -> None:
        if up == self._session_up:
            return
        self._session_up = up
        if self._on_connection is not None:
            try:
                self._on_connection(up)
            except Exception:
                log.exception("push: connection handler failed")

    # --- what arrives ------------------------------------------------------------------------------

    def _on_applied(self, doc: EffectiveDocument) -> None:
        self._changed.set()

    def _on_message(self, message: Message) -> None:
        topic, payload = message.topic, message.payload
        if topic == self._cmd_topic:
            self._on_command_message(payload)
            return
        doc = self._core.document
        if doc is not None and topic == self._held_topic():
            if not payload:
                # The manager cleared the retained document: the (group, location) no longer exists.
                # The next heartbeat brings the document of wherever the agent belongs now.
                log.info("the document of %s was withdrawn; asking the manager", topic)
                self._on_withdrawn()
                return
            self._core.offer(payload, source="mqtt", expect=(doc.group_id, doc.location_id))
            return
        self._on_foreign_message(topic)

    def _on_withdrawn(self) -> None:
        now = datetime.now(UTC)
        self._on_command(
            AgentCommand(command="update_now", id=f"withdrawn-{now.timestamp():.0f}", issued_at=now)
        )

    def _on_foreign_message(self, topic: str) -> None:
        try:
            parsed = parse_topic(self._prefix, topic)
        except InvalidTopic as exc:
            log.warning("push: dropped a message on an unexpected topic: %s", exc)
            return
        if not isinstance(parsed, ConfigTopic):
            log.warning("push: dropped a message on %s, not a topic this agent reads", topic)
            return
        log.info("push: ignored a document on %s: the agent holds another (group, location)", topic)
        if topic != self._subscribed and topic not in self._stale:
            self._stale.add(topic)  # left over from an earlier session: leave it
            self._changed.set()

    def _on_command_message(self, payload: bytes) -> None:
        try:
            command = AgentCommand.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("push: dropped a malformed command: %s", _summary(exc))
            return
        if command.id in self._recent_commands:
            log.debug("push: ignored command %s delivered again", command.id)
            return
        self._recent_commands.append(command.id)
        log.info("push: command %s (id %s) from the manager", command.command, command.id)
        try:
            self._on_command(command)
        except Exception:
            log.exception("push: command handler failed on %s", command.id)

    # --- topics and the link -----------------------------------------------------------------------

    @property
    def _prefix(self) -> str:
        return topic_prefix(self._core.identity)

    @property
    def _cmd_topic(self) -> str:
        return cmd_topic(self._prefix, self._core.identity.agent_id)

    @property
    def _state_topic(self) -> str:
        return state_topic(self._prefix, self._core.identity.agent_id)

    def _held_topic(self) -> str | None:
        doc = self._core.document
        return None if doc is None else config_topic(self._prefix, doc.group_id, doc.location_id)

    @property
    def _qos(self) -> int:
        """The QoS of the agent's subscriptions (cmd and config topics), as its broker engine asks."""
        return delivery_of(self._core.identity).qos

    def _new_link(self) -> Link:
        identity = self._core.identity
        will = Message(self._state_topic, will_payload(identity.agent_id), qos=1, retain=True)
        self._link = self._link_factory(link_options(identity, self._settings, will=will), self._on_message)
        self._link_trust = tuple(identity.trusted_cas)
        return self._link


async def _unless_stopped(work: Coroutine[Any, Any, None], stopped: asyncio.Future[Any]) -> bool:
    """Run `work` unless `stopped` completes first (then cancel it); False if it was cut short."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    if not task.cancelled() and task.done():
        task.result()  # raises what `work` raised
        return True
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False


class _Lost(LinkError):
    """The connection dropped while the session was idle."""


async def _first_of(
    stopped: asyncio.Future[Any], *events: asyncio.Event, limit_s: float | None = None
) -> None:
    """Wait until `stopped` is done or one of `events` is set, at most `limit_s` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait([stopped, *waiters], timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _summary(exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}" for e in exc.errors()[:3]]
    return "; ".join(parts)
