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
- it reconnects with jittered back-off: when a node of the broker failed (or dropped the session) and
  another has not failed since the last good session, it fails over to that one within
  `uniform(0, reconnect_min_s)`, so that a dead node's agents move to the others within about a second
  and not all at the same instant; once every node has failed, with exponential back-off and full
  jitter between reconnect_min_s and reconnect_max_s, doubling with each such retry (`backoff_s`);
- over mqtts:// it trusts exactly the identity's CAs (`agent_stub.trust`); when a document changed
  them, the next connection is a new link that trusts the new ones;
- it speaks the MQTT version of the broker engine (`delivery.protocol`: 5 for Mosquitto, 3.1.1 for NATS)
  and connects to one of the credentials' broker URLs at random, failing over to another node on the
  next attempt (`MqttLink`);
- when the identity's broker credentials change (a heartbeat's `mqtt`, a `credentials` command: the
  runtime adopts them through `AgentCore.adopt_credentials`), it ends the session cleanly (DISCONNECT:
  no will, the retained state stays online) and opens a new one with them at once;
- when the broker refuses the connection as not authorised and the credentials have expired (a NATS JWT
  the manager could not renew in time), it does not retry them: it says so once, asks the manager for a
  heartbeat, and waits until the manager's answer brings new ones.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from agent_stub.broker_account import (
    NOT_AUTHORISED,
    delivery_of,
    expired,
    link_options,
    push_blocker,
    topic_prefix,
)
from agent_stub.core import AgentCore
from agent_stub.errors import LinkError, LinkRefused
from agent_stub.mqtt_link import Link, LinkFactory, Message
from fabric_core.errors import InvalidTopic
from fabric_core.settings import AgentSettings
from fabric_core.topics import (
    ConfigTopic,
    cmd_topic,
    config_topic,
    parse_topic,
    state_topic,
)
from fabric_core.wire import (
    AgentCommand,
    AgentStateReport,
    EffectiveDocument,
    Mode,
    MqttCredentials,
)

log = logging.getLogger(__name__)

CommandHandler = Callable[[AgentCommand], None]
ConnectionHandler = Callable[[bool], None]
"""Told True when the session is up (subscribed), False when it is down."""

_RECENT_COMMANDS = 64
"""Command ids remembered, to act once on each: QoS 1 may deliver a command twice, and over NATS (QoS 0)
the manager sends it again until it sees the agent act."""
_MAX_DOUBLINGS = 32


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
        self._link_credentials: MqttCredentials | None = None
        """The broker credentials the link was made with: others held now mean a new link."""
        self._changed = asyncio.Event()
        self._session_up = False
        self._subscribed: str | None = None
        """The config topic subscribed to (in this session, or left in the broker's session)."""
        self._stale: set[str] = set()
        """Config topics to leave."""
        self._reported: tuple[int, int, int | None] | None = None
        self._recent_commands: deque[str] = deque(maxlen=_RECENT_COMMANDS)
        self._failures = 0
        self._backoffs = 0
        """Retries since the last good session with no untried node left: the back-off's exponent."""
        self._last_error: str | None = None
        self._asked_about: tuple[MqttCredentials | None, str] | None = None
        """The credentials and config topic a refusal already made the agent ask the manager about."""
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
        detach_credentials = self._core.add_credentials_listener(self._on_credentials)
        stopped = asyncio.ensure_future(stop.wait())
        self._failures = self._backoffs = 0
        try:
            while not stopped.done() and self.wanted:
                failure = await self._session(stopped)
                if failure is None or stopped.done() or not self.wanted:
                    continue
                if self._refused_as_expired(failure):
                    await self._await_credentials(stopped)
                else:
                    self._ask_if_moved(failure)
                    await self._pause(self._failed(failure.error, failure.level), stopped)
        finally:
            detach()
            detach_credentials()
            stopped.cancel()
            # Cancelled or stopped: keep the broker session for the next run; switched to pull: end it.
            await self._leave(switched_to_pull=not stop.is_set() and not self.wanted)

    async def _session(self, stopped: asyncio.Future[Any]) -> _Failure | None:
        """One connection, from connect to its end; returns why it ended badly (and a log level)."""
        link = self._link
        if link is None or not self._link_current():
            if link is not None:
                await self._retire(link)
            link = self._new_link()
        error: str | None = None
        level = logging.WARNING
        refusal: LinkRefused | None = None
        try:
            # Raced against stop: connecting to a silent broker must not hold up a shutdown.
            if not await _unless_stopped(self._connect(link), stopped):
                return None
            await self._follow(link, stopped)
        except LinkRefused as exc:
            # Credentials or ACL: not going to fix itself soon, and the operator must hear of it.
            error, level, refusal = f"push session refused: {exc}", logging.ERROR, exc
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
        return _Failure(error, level, refusal)

    def _link_current(self) -> bool:
        """Whether the link was made with the CAs and the broker credentials the identity holds now."""
        identity = self._core.identity
        return self._link_trust == tuple(identity.trusted_cas) and self._link_credentials is identity.mqtt

    async def _retire(self, link: Link) -> None:
        """End a link made with what the identity no longer holds: a clean DISCONNECT (the broker drops
        the will, and the retained state says online until the next session reports again)."""
        self._link = None
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                await link.close()
        except (LinkError, TimeoutError) as exc:
            log.info("push: could not close the old connection cleanly (%s); dropping it", exc or "timed out")
            link.abort()

    def _refused_as_expired(self, failure: _Failure) -> bool:
        """The broker refused the connection as not authorised, and the credentials have expired."""
        refusal = failure.refusal
        return (
            refusal is not None
            and refusal.operation == "connect"
            and refusal.reason_code in NOT_AUTHORISED
            and expired(self._core.identity.mqtt)
        )

    def _ask_if_moved(self, failure: _Failure) -> None:
        """Heartbeat at once when the broker refuses the held group's config topic: the agent's access
        no longer covers it, so it was most likely moved (NATS: a move's new JWT arrives on the cmd
        topic, and the "update now" sent with it can be lost while the agent reconnects with it). The
        answer brings the new group's document, and the next attempt subscribes to its topic. Asked once
        per credentials and topic, so that an ACL that is simply wrong does not make it heartbeat on
        every retry."""
        refusal, topic = failure.refusal, self._held_topic()
        if refusal is None or topic is None or refusal.operation != f"subscribe to {topic}":
            return
        asked = (self._core.identity.mqtt, topic)
        if asked != self._asked_about:
            self._asked_about = asked
            self._ask_manager("refused-subscription")

    async def _await_credentials(self, stopped: asyncio.Future[Any]) -> None:
        """Wait, without retrying, until the manager hands the agent new broker credentials."""
        held = self._core.identity.mqtt
        assert held is not None and held.expires_at is not None  # `_refused_as_expired` says so
        log.warning(
            "push: the broker refused the agent's credentials, which expired at %s; not retrying them: "
            "waiting for the manager to renew them (asking it now; heartbeats go on meanwhile)",
            held.expires_at.isoformat(timespec="seconds"),
        )
        self._last_error = None
        self._ask_manager("credentials-expired")
        while not stopped.done() and self.wanted and self._core.identity.mqtt is held:
            self._changed.clear()
            await _first_of(stopped, self._changed)
        if self._core.identity.mqtt is not held:
            log.info("push: new broker credentials arrived; connecting with them")

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
        self._failures = self._backoffs = 0
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
            if self._link_credentials is not self._core.identity.mqtt:
                # New CAs wait for the next connection (the session up was verified under the old
                # ones, which were the agent's until now); new credentials are used at once.
                log.info("push: reconnecting with the new broker credentials")
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
        """Wait `delay` before reconnecting; end early if stopped, push mode is over, or new broker
        credentials arrived (the refused ones may be why the last attempt failed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while not stopped.done() and self.wanted and self._link_credentials is self._core.identity.mqtt:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            await _first_of(stopped, self._changed, limit_s=remaining)

    def _failed(self, error: str, level: int = logging.WARNING) -> float:
        """The pause before the next attempt: a failover soon (jittered), else a back-off."""
        self._failures += 1
        low, high = self._settings.reconnect_min_s, self._settings.reconnect_max_s
        link = self._link
        if link is not None and link.fails_over:
            # The node failed, another has not: that one is no reason to wait. Jittered from 0, since
            # a dead node's agents all lost it at the same instant (a 3-node NATS cluster).
            delay = self._rng.uniform(0.0, low)
        else:
            # Every node failed since the last good session (or a connected node refused something).
            self._backoffs += 1
            delay = backoff_s(self._backoffs, low, high, self._rng)
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

    def _on_credentials(self, credentials: MqttCredentials) -> None:
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
        self._ask_manager("withdrawn")

    def _ask_manager(self, why: str) -> None:
        """Heartbeat at once, as the manager's "update now" would have it."""
        now = datetime.now(UTC)
        try:
            command_id = f"{why}-{now.timestamp():.0f}"
            self._on_command(AgentCommand(command="update_now", id=command_id, issued_at=now))
        except Exception:
            log.exception("push: command handler failed on %s", why)

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
        if command.command == "credentials" and command.mqtt is None:
            log.warning("push: dropped a malformed command: credentials without mqtt (id %s)", command.id)
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
        options = link_options(identity, self._settings, will=will, rng=self._rng)
        self._link = self._link_factory(options, self._on_message)
        self._link_trust = tuple(identity.trusted_cas)
        self._link_credentials = identity.mqtt
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


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why a session ended badly: what to log, how loud, and the broker's refusal if it refused."""

    error: str
    level: int
    refusal: LinkRefused | None = None


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
