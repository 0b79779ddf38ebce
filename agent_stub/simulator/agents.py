"""One simulated agent: the real agent logic with its state in memory, or a bare MQTT client as a baseline.

`SimAgent` is `AgentCore` over a memory state store and an `AgentRuntime`, as `policycast-agent run`
has them, plus the timestamps benchmarks read (`Timestamps`): each applied serial, the last config
message handled (through `SimLink`, the agent's `MqttLink` with its connects paced) and the moment its
push session came up (through `_ObservedStore`). `BareAgent` keeps only the MQTT part (its broker
account and topics on the same link), for the baselines. `Pacer` spaces connects so that a fleet
starting or coming back at once does not overflow the broker's listen backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from agent_stub.broker_account import link_options, topic_prefix
from agent_stub.core import AgentCore
from agent_stub.errors import LinkError
from agent_stub.manager_client import ManagerClient
from agent_stub.mqtt_link import LinkOptions, Message, MessageHandler, MqttLink
from agent_stub.push import backoff_s
from agent_stub.runtime import AgentRuntime
from agent_stub.simulator.plan import DocumentKey, SimIdentity
from agent_stub.simulator.stats import CountingClient, FleetStats
from agent_stub.state import AgentStatus, Identity, MemoryStateStore
from fabric_core.serials import NO_SERIAL
from fabric_core.topics import cmd_topic, config_topic
from fabric_core.wire import EffectiveDocument, Mode

if TYPE_CHECKING:
    from agent_stub.simulator.fleet import SimulatedFleet

log = logging.getLogger(__name__)

APPLIED_KEPT = 8
"""Applied serials remembered per agent (for latencies): the last few are all a benchmark needs."""


WINDOW_S = 0.1
"""The pacer counts the connects it let go per window of this length (the loop's clock)."""
BURST = 2.0
"""At most this many times `rate` connects go in one window, however late their waiters woke."""


class Pacer:
    """Hands out start slots `1/rate` apart, in arrival order, each with a little random jitter.

    A slot is a time to wake at, and a stalled loop wakes late: every waiter whose slot passed during a
    stall (a fleet of agents verifying a document at once) wakes in the same turn of the loop, and a
    thousand connects starting together overflow what the pace protects, the broker's listen backlog and
    TLS handshake timeout (and the loop itself, which then stalls again on their handshakes). So at most
    `BURST` times the rate go per `WINDOW_S`: a waiter woken beyond that takes the next free slot, in turn.
    """

    def __init__(self, rate: float, *, jitter_s: float = 0.0, rng: random.Random | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self.jitter_s = jitter_s
        self.per_window = max(1, math.ceil(rate * WINDOW_S * BURST))
        self._rng = rng or random.Random()
        self._next = 0.0
        self._window = (0.0, 0)
        """(start, connects let go) of the current window."""
        self.granted = 0
        self.reslotted = 0
        """Waiters that woke in a window already full, and took another slot."""

    def delay(self, now: float) -> float:
        """Reserve the next slot; returns how long to wait for it from `now`."""
        slot = max(now, self._next)
        self._next = slot + self.interval
        self.granted += 1
        return slot - now + (self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0)

    def admit(self, now: float) -> bool:
        """Whether a waiter woken at `now` may go: its window has room (then it counts there)."""
        start, count = self._window
        if now - start >= WINDOW_S:
            start, count = now, 0
        if count >= self.per_window:
            return False
        self._window = (start, count + 1)
        return True

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self.delay(loop.time())
            if delay > 0:
                await asyncio.sleep(delay)
            if self.admit(loop.time()):
                return
            self.reslotted += 1


class _ObservedStore(MemoryStateStore):
    """A `MemoryStateStore` that tells its agent when the reported transport changes."""

    def __init__(self, identity: Identity, on_transport: Callable[[Mode | None], None]) -> None:
        super().__init__(identity)
        self._on_transport = on_transport
        self._transport: Mode | None = None

    def save_status(self, status: AgentStatus) -> None:
        self.status = status  # AgentCore hands over a fresh copy each time: no need for another
        if status.transport != self._transport:
            self._transport = status.transport
            self._on_transport(status.transport)


class SimLink(MqttLink):
    """`MqttLink` whose connects wait for the fleet's pacer and whose config messages are timestamped."""

    def __init__(
        self,
        options: LinkOptions,
        on_message: MessageHandler,
        *,
        agent: Timestamps,
        pacer: Pacer,
        stats: FleetStats,
        config_head: str,
    ) -> None:
        super().__init__(options, self._handle)
        self._inner_handler = on_message
        self._agent = agent
        self._pacer = pacer
        self._stats = stats
        self._config_head = config_head

    async def connect(self) -> bool:
        if not self.connected:
            await self._pacer.wait()
            self._stats.connect()
        try:
            return await super().connect()
        except Exception:
            self._stats.connect_failures += 1
            raise

    def _handle(self, message: Message) -> None:
        self._inner_handler(message)
        if message.topic.startswith(self._config_head):
            self._agent.config_message_handled()


class Timestamps:
    """What every simulated agent, full or bare, tells benchmarks (wall clock)."""

    __slots__ = ("_fleet", "config_at", "index", "session_at", "site", "transport")

    def __init__(self, fleet: SimulatedFleet, index: int, sim: SimIdentity) -> None:
        self._fleet = fleet
        self.index = index
        self.site = sim.site
        self.config_at = 0.0
        """When the agent last finished handling a message on a config topic."""
        self.session_at = 0.0
        """When the agent's push session last came up."""
        self.transport: Mode | None = None

    @property
    def push_session(self) -> bool:
        return self.transport == "push"

    def config_message_handled(self) -> None:
        self.config_at = time.time()
        self._fleet.poke(self)

    def _set_transport(self, transport: Mode | None) -> None:
        self.transport = transport
        if transport == "push":
            self.session_at = time.time()
        self._fleet.poke(self)

    def _link_for(self, options: LinkOptions, on_message: MessageHandler, prefix: str) -> SimLink:
        fleet = self._fleet
        nodes = fleet.broker_override
        if nodes:
            # Applied to every link, so that credentials the manager renews keep the benchmark's broker.
            options = replace(options, address=nodes[0], addresses=nodes if len(nodes) > 1 else ())
        return SimLink(
            options,
            on_message,
            agent=self,
            pacer=fleet.pacer,
            stats=fleet.stats,
            config_head=fleet.config_head(prefix),
        )


class SimAgent(Timestamps):
    """One agent of the fleet: the real core and runtime, plus the timestamps benchmarks read."""

    __slots__ = ("applied", "core", "runtime")

    def __init__(self, fleet: SimulatedFleet, index: int, sim: SimIdentity) -> None:
        super().__init__(fleet, index, sim)
        self.applied: list[tuple[int, float, float]] = []
        """(serial, applied at, issued at) of the last few applied documents, wall clock."""
        identity = sim.identity
        store = _ObservedStore(identity, self._set_transport)
        self.core = AgentCore(identity=identity, store=store)
        self.core.add_listener(self._on_applied)
        client = ManagerClient(
            server=fleet.plan.server, agent_id=identity.agent_id, secret=identity.secret, http=fleet.http
        )
        facts = fleet.facts_of_site(self.site)
        self.runtime = AgentRuntime(
            self.core,
            CountingClient(client, fleet.stats, fleet.http_slots),
            fleet.settings,
            link_factory=self._link,
            hostname=identity.hostname,
            rng=random.Random(fleet.plan.seed * 1_000_003 + index),
            read_facts=lambda: facts,
        )

    @property
    def key(self) -> DocumentKey | None:
        doc = self.core.document
        return None if doc is None else (doc.group_id, doc.location_id)

    @property
    def serial(self) -> int:
        return self.core.serial

    @property
    def mode(self) -> Mode:
        return self.core.mode

    @property
    def has_document(self) -> bool:
        return self.core.document is not None

    @property
    def sessions(self) -> int:
        return self.runtime.push.sessions

    async def run(self, stop: asyncio.Event) -> None:
        await self.runtime.run(stop)

    def applied_at(self, serial: int) -> float | None:
        """When the agent first applied `serial` or a later one (of the last few it remembers)."""
        times = [at for held, at, _ in self.applied if held >= serial]
        return min(times) if times else None

    def _link(self, options: LinkOptions, on_message: MessageHandler) -> SimLink:
        return self._link_for(options, on_message, topic_prefix(self.core.identity))

    def _on_applied(self, doc: EffectiveDocument) -> None:
        self.applied.append((doc.serial, time.time(), doc.issued_at.timestamp()))
        if len(self.applied) > APPLIED_KEPT:
            del self.applied[0]
        self._fleet.poke(self)


class BareAgent(Timestamps):
    """A baseline: the agent's broker account and topics on the same `MqttLink`, without the agent.

    It connects (through the same pacer, on the session its broker engine asks for), subscribes to its
    cmd topic and its (group, location) config topic at the engine's QoS, reconnects at once when the
    connection drops and with `backoff_s` after each failed attempt (on the same link, so it picks the
    broker's nodes as the agent does). No document is
    verified or applied, no state is reported, no heartbeat is sent: what is left is the MQTT floor.
    """

    __slots__ = ("_qos", "_rng", "_settings", "key", "link", "sessions", "topics")

    serial = NO_SERIAL
    mode: Mode = "push"

    def __init__(self, fleet: SimulatedFleet, index: int, sim: SimIdentity, key: DocumentKey) -> None:
        super().__init__(fleet, index, sim)
        identity = sim.identity
        if identity.mqtt is None:
            raise ValueError(f"agent {identity.agent_id} has no broker account")
        prefix = topic_prefix(identity)
        self.key: DocumentKey | None = key
        self.topics = (cmd_topic(prefix, identity.agent_id), config_topic(prefix, *key))
        self._settings = fleet.settings
        self._rng = random.Random(fleet.plan.seed * 1_000_003 + index)
        self.sessions = 0
        self._qos = identity.mqtt.delivery.qos
        options = link_options(identity, fleet.settings, rng=self._rng)
        self.link = self._link_for(options, self._on_message, prefix)

    @property
    def has_document(self) -> bool:
        return self.config_at > 0

    def applied_at(self, serial: int) -> float | None:
        return None

    def _on_message(self, message: Message) -> None:
        return None  # SimLink timestamps config messages

    async def run(self, stop: asyncio.Event) -> None:
        settings = self._settings
        failures = 0
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                try:
                    await self.link.connect()
                    for topic in self.topics:
                        await self.link.subscribe(topic, qos=self._qos)
                    self.sessions += 1
                    failures = 0
                    self._set_transport("push")
                    lost = asyncio.ensure_future(self.link.disconnected.wait())
                    await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    lost.cancel()
                    self._set_transport(None)
                except Exception as exc:
                    if not isinstance(exc, LinkError):  # a bug must not end the baseline's reconnects
                        log.error("bare client %d: unexpected error", self.index, exc_info=exc)
                    self._set_transport(None)
                    self.link.abort()
                    failures += 1
                    delay = backoff_s(failures, settings.reconnect_min_s, settings.reconnect_max_s, self._rng)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(stopped), timeout=delay)
        finally:
            stopped.cancel()
            with contextlib.suppress(LinkError, TimeoutError):
                await self.link.close()


AnyAgent = SimAgent | BareAgent
