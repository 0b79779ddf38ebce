"""The fleet simulator: many agents in one process, running the real agent logic with state in memory.

`policycast-agent simulate --agents N` enrols N agents against a running manager (or reuses identities
kept from an earlier run) and runs each exactly as `policycast-agent run` would: an `AgentCore` (signature,
group and serial checks, apply) over a `MemoryStateStore`, and an `AgentRuntime` (heartbeats, the push
session while the document says push, location awareness). What is shared is what a process can share
without changing the logic:

- one event loop (uvloop when installed) drives every paho-mqtt client through `MqttLink`'s external-loop
  socket callbacks (epoll underneath), so no agent owns a thread;
- one `httpx.AsyncClient` connection pool carries every agent's heartbeats (its pool wait is unbounded:
  waiting for a pooled connection is an artefact of the simulation, not a manager failure);
- a `Pacer` (a token bucket with jitter) spaces the start of agents and every MQTT connect, so that a
  fleet that starts or comes back at once does not overflow the broker's small listen backlog.

Agents are spread round-robin over groups and, within a group, over locations: each agent reports a host
fact `site` (`site-1`, `site-2`, ...; none for the Default location) and the simulator, when it prepares
the groups with an admin key, gives location `site-k` a condition on that fact. The agents then find
their location themselves, through the same `LocationTracker` as a real agent.

For benchmarks every agent keeps a few timestamps (wall clock, `time.time()`): each applied serial (an
`AgentCore` listener), the last config message handled (a wrapper around the link's message handler) and
the moment its push session came up (observed through its state store). `--control` turns stdin/stdout
into a JSON-lines channel through which a benchmark asks for summaries and waits for the fleet to reach
a state (`wait_converged`, `wait_messages`, `wait_sessions`), with latency percentiles from a given time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import math
import random
import resource
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx
import orjson
from pydantic import BaseModel, ConfigDict

from agent_stub.core import AgentCore
from agent_stub.errors import LinkError, ManagerError, ManagerUnreachable
from agent_stub.facts import HostFacts
from agent_stub.files import write_atomically
from agent_stub.manager_client import ManagerClient, normalize_server
from agent_stub.mqtt_link import LinkOptions, MessageHandler, MqttLink
from agent_stub.push import backoff_s, topic_prefix
from agent_stub.runtime import AgentRuntime
from agent_stub.state import AgentStatus, Identity, MemoryStateStore
from fabric_core.serials import NO_SERIAL
from fabric_core.settings import AgentSettings, MqttAddress
from fabric_core.topics import all_configs_filter, cmd_topic, config_topic
from fabric_core.wire import EffectiveDocument, HeartbeatRequest, HeartbeatResponse, Mode

log = logging.getLogger(__name__)

FleetMode = Literal["push", "pull", "mix"]
DocumentKey = tuple[int, int]
SITE_FACT = "site"
"""The host fact that places a simulated agent: `site-k` matches the group's location `site-k`."""
SITE_WEIGHT = 10
IDENTITIES_VERSION = 1
FACTS_CHECK_S = 3600.0
"""Simulated facts never change: no agent needs to look again soon (each look is a thread hop)."""
APPLIED_KEPT = 8
"""Applied serials remembered per agent (for latencies): the last few are all a benchmark needs."""


def site_name(site: int) -> str:
    return f"site-{site}"


def key_text(key: DocumentKey) -> str:
    return f"{key[0]}/{key[1]}"


def parse_key(text: str) -> DocumentKey:
    group, location = text.split("/")
    return int(group), int(location)


# --- the plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetPlan:
    """What to simulate and against which manager."""

    agents: int
    server: str
    admin_key: str | None = None
    tokens: tuple[str, ...] = ()
    mode: FleetMode = "push"
    groups: int = 10
    locations: int = 2
    group_prefix: str = "sim"
    heartbeat_s: int | None = None
    connect_rate: float = 500.0
    start_rate: float | None = None
    """Agents started per second (each sends its first heartbeat at once); default: connect_rate."""
    jitter_s: float = 0.05
    http_connections: int = 16
    enrol_concurrency: int = 8
    identities: Path | None = None
    mqtt_url: str | None = None
    """Overrides the broker address learnt at enrolment (a benchmark's broker may move to another port)."""
    seed: int = 0
    ready_timeout_s: float = 600.0
    loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    bare: bool = False
    """A baseline: `BareAgent`s (MQTT connect and subscribe only) instead of agents; needs admin_key."""

    def mode_of_group(self, index: int) -> Mode:
        if self.mode == "mix":
            return "push" if index % 2 == 0 else "pull"
        return self.mode

    def group_name(self, index: int) -> str:
        return f"{self.group_prefix}-{index + 1:02d}"

    def site_of(self, agent_index: int) -> int:
        """0 (Default) .. locations-1, spread evenly within each group."""
        width = max(1, len(self.tokens) or self.groups)
        return (agent_index // width) % max(1, self.locations)


class SimIdentity(BaseModel):
    """One simulated agent as kept in the identities file."""

    model_config = ConfigDict(extra="ignore")

    identity: Identity
    site: int = 0


class IdentitiesFile(BaseModel):
    version: int = IDENTITIES_VERSION
    server: str
    agents: list[SimIdentity]


def load_identities(path: Path | None) -> list[SimIdentity]:
    if path is None or not path.exists():
        return []
    stored = IdentitiesFile.model_validate_json(path.read_bytes())
    if stored.version != IDENTITIES_VERSION:
        raise ValueError(f"{path}: identities file version {stored.version}, expected {IDENTITIES_VERSION}")
    return stored.agents


def save_identities(path: Path, server: str, agents: Sequence[SimIdentity]) -> None:
    """Atomically, 0600: the file holds every agent's secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = IdentitiesFile(server=server, agents=list(agents)).model_dump_json().encode()
    write_atomically(path, data, mode=0o600)


# --- process-wide plumbing -----------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (every agent holds a socket); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def cache_missing_sniffio() -> None:
    """Make a missing `sniffio` fail fast on import.

    httpcore imports `sniffio` on every request (to tell asyncio from trio) and falls back to asyncio when
    it is absent, as it is with recent anyio. A failed import is not cached: each one searches sys.path
    on disk, which cost about a tenth of the simulator's CPU. `None` in `sys.modules` is Python's own way
    of saying "not importable", answered without a search.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux), 0 where /proc is not available."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentiles(values: Iterable[float]) -> dict[str, float | int]:
    """p50/p90/p99/max (nearest-rank), min, mean and count of `values`, in the values' unit."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "count": len(ordered),
        "min": round(ordered[0], 4),
        "p50": round(rank(0.50), 4),
        "p90": round(rank(0.90), 4),
        "p99": round(rank(0.99), 4),
        "max": round(ordered[-1], 4),
        "mean": round(sum(ordered) / len(ordered), 4),
    }


class Pacer:
    """Hands out start slots `1/rate` apart, in arrival order, each with a little random jitter."""

    def __init__(self, rate: float, *, jitter_s: float = 0.0, rng: random.Random | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self.jitter_s = jitter_s
        self._rng = rng or random.Random()
        self._next = 0.0
        self.granted = 0

    def delay(self, now: float) -> float:
        """Reserve the next slot; returns how long to wait for it from `now`."""
        slot = max(now, self._next)
        self._next = slot + self.interval
        self.granted += 1
        return slot - now + (self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0)

    async def wait(self) -> None:
        delay = self.delay(asyncio.get_running_loop().time())
        if delay > 0:
            await asyncio.sleep(delay)


class _KeepOpen(httpx.AsyncBaseTransport):
    """The shared pool's transport, lent to a client that would close it (`ManagerClient.enroll`)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        return None


# --- counters --------------------------------------------------------------------------------------------


@dataclass
class FleetStats:
    """Fleet-wide counters, with per-second buckets (wall clock seconds) for rates."""

    heartbeats: Counter[str] = field(default_factory=Counter)
    heartbeats_per_s: Counter[int] = field(default_factory=Counter)
    pull_heartbeats_per_s: Counter[int] = field(default_factory=Counter)
    """Heartbeats sent while the agent had no push session (push agents falling back, and pull agents)."""
    heartbeat_failures: int = 0
    heartbeat_failures_per_s: Counter[int] = field(default_factory=Counter)
    heartbeat_failure_kinds: Counter[str] = field(default_factory=Counter)
    connects: int = 0
    connects_per_s: Counter[int] = field(default_factory=Counter)
    connect_failures: int = 0
    heartbeats_pending: int = 0
    """Heartbeats asked for and not answered yet: waiting for one of the pool's connections, or in flight."""

    def heartbeat(self, transport: Mode) -> None:
        second = int(time.time())
        self.heartbeats[transport] += 1
        self.heartbeats_per_s[second] += 1
        if transport == "pull":
            self.pull_heartbeats_per_s[second] += 1

    def heartbeat_failed(self, exc: Exception) -> None:
        self.heartbeat_failures += 1
        self.heartbeat_failures_per_s[int(time.time())] += 1
        cause = exc.__cause__
        self.heartbeat_failure_kinds[type(cause or exc).__name__] += 1

    def connect(self) -> None:
        self.connects += 1
        self.connects_per_s[int(time.time())] += 1

    def rates(self, since: float | None = None, until: float | None = None) -> dict[str, Any]:
        def window(counter: Counter[int]) -> dict[int, int]:
            return {
                s: n
                for s, n in counter.items()
                if (since is None or s >= int(since)) and (until is None or s <= int(until))
            }

        beats, pulls, connects, failures = (
            window(self.heartbeats_per_s),
            window(self.pull_heartbeats_per_s),
            window(self.connects_per_s),
            window(self.heartbeat_failures_per_s),
        )
        return {
            "heartbeats_peak_per_s": max(beats.values(), default=0),
            "pull_heartbeats_peak_per_s": max(pulls.values(), default=0),
            "connects_peak_per_s": max(connects.values(), default=0),
            "heartbeats": sum(beats.values()),
            "pull_heartbeats": sum(pulls.values()),
            "connects": sum(connects.values()),
            "heartbeat_failures": sum(failures.values()),
            "heartbeat_failure_kinds": dict(self.heartbeat_failure_kinds),
            "heartbeats_pending": self.heartbeats_pending,
        }


# --- one simulated agent -----------------------------------------------------------------------------------


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


class _CountingClient:
    """The agent's `ManagerClient`, counting heartbeats as they leave.

    Requests wait for one of the pool's connections in a FIFO semaphore of the pool's size rather than
    in httpcore's own queue, whose every hand-over scans all waiting requests: with thousands waiting
    (a fleet starting, or reconnecting after an outage) that scan alone used most of the simulator's CPU.
    """

    __slots__ = ("_inner", "_slots", "_stats")

    def __init__(self, inner: ManagerClient, stats: FleetStats, slots: asyncio.Semaphore) -> None:
        self._inner = inner
        self._stats = stats
        self._slots = slots

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        self._stats.heartbeats_pending += 1
        try:
            async with self._slots:
                self._stats.heartbeat(request.mode)
                try:
                    return await self._inner.heartbeat(request)
                except ManagerError as exc:
                    self._stats.heartbeat_failed(exc)
                    raise
        finally:
            self._stats.heartbeats_pending -= 1


class SimLink(MqttLink):
    """`MqttLink` whose connects wait for the fleet's pacer and whose config messages are timestamped."""

    def __init__(
        self,
        options: LinkOptions,
        on_message: MessageHandler,
        *,
        agent: _Timestamps,
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

    def _handle(self, topic: str, payload: bytes) -> None:
        self._inner_handler(topic, payload)
        if topic.startswith(self._config_head):
            self._agent.config_message_handled()


class _Timestamps:
    """What every simulated agent, full or bare, tells benchmarks (wall clock)."""

    __slots__ = ("_fleet", "config_at", "index", "session_at", "site", "transport")

    def __init__(self, fleet: Fleet, index: int, sim: SimIdentity) -> None:
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
        return SimLink(
            options,
            on_message,
            agent=self,
            pacer=fleet.pacer,
            stats=fleet.stats,
            config_head=fleet.config_head(prefix),
        )


def _with_broker(identity: Identity, mqtt_url: str | None) -> Identity:
    if mqtt_url and identity.mqtt is not None:
        return identity.model_copy(update={"mqtt": identity.mqtt.model_copy(update={"url": mqtt_url})})
    return identity


class SimAgent(_Timestamps):
    """One agent of the fleet: the real core and runtime, plus the timestamps benchmarks read."""

    __slots__ = ("applied", "core", "runtime")

    def __init__(self, fleet: Fleet, index: int, sim: SimIdentity) -> None:
        super().__init__(fleet, index, sim)
        self.applied: list[tuple[int, float, float]] = []
        """(serial, applied at, issued at) of the last few applied documents, wall clock."""
        identity = _with_broker(sim.identity, fleet.plan.mqtt_url)
        store = _ObservedStore(identity, self._set_transport)
        self.core = AgentCore(identity=identity, store=store)
        self.core.add_listener(self._on_applied)
        client = ManagerClient(
            server=fleet.plan.server, agent_id=identity.agent_id, secret=identity.secret, http=fleet.http
        )
        facts = fleet.facts_of_site(self.site)
        self.runtime = AgentRuntime(
            self.core,
            _CountingClient(client, fleet.stats, fleet.http_slots),
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


class BareAgent(_Timestamps):
    """A baseline: the agent's broker account and topics on the same `MqttLink`, without the agent.

    It connects (through the same pacer), subscribes to its cmd topic and its (group, location) config
    topic, and reconnects with the push loop's back-off when the connection drops. No document is
    verified or applied, no state is reported, no heartbeat is sent: what is left is the MQTT floor.
    """

    __slots__ = ("_rng", "_settings", "key", "link", "sessions", "topics")

    serial = NO_SERIAL
    mode: Mode = "push"

    def __init__(self, fleet: Fleet, index: int, sim: SimIdentity, key: DocumentKey) -> None:
        super().__init__(fleet, index, sim)
        identity = _with_broker(sim.identity, fleet.plan.mqtt_url)
        credentials = identity.mqtt
        if credentials is None:
            raise ValueError(f"agent {identity.agent_id} has no broker account")
        prefix = topic_prefix(identity)
        self.key: DocumentKey | None = key
        self.topics = (cmd_topic(prefix, identity.agent_id), config_topic(prefix, *key))
        self._settings = fleet.settings
        self._rng = random.Random(fleet.plan.seed * 1_000_003 + index)
        self.sessions = 0
        options = LinkOptions(
            address=MqttAddress.parse(credentials.url),
            client_id=identity.agent_id,
            username=credentials.username,
            password=credentials.password,
            keepalive_s=fleet.settings.mqtt_keepalive_s,
            session_expiry_s=fleet.settings.mqtt_session_expiry_s,
            timeout_s=fleet.settings.request_timeout_s,
        )
        self.link = self._link_for(options, self._on_message, prefix)

    @property
    def has_document(self) -> bool:
        return self.config_at > 0

    def applied_at(self, serial: int) -> float | None:
        return None

    def _on_message(self, topic: str, payload: bytes) -> None:
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
                        await self.link.subscribe(topic, qos=1)
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
Predicate = Callable[[Any], bool]


# --- waiting for the fleet -------------------------------------------------------------------------------


class _Wait:
    """Agents still short of a condition; re-checked for one agent whenever something happens to it."""

    def __init__(self, agents: Sequence[AnyAgent], predicate: Predicate) -> None:
        self.predicate = predicate
        self.agents = list(agents)
        self.pending = {agent.index for agent in agents if not predicate(agent)}
        self.done = asyncio.Event()
        if not self.pending:
            self.done.set()

    def check(self, agent: _Timestamps) -> None:
        if agent.index in self.pending and self.predicate(agent):
            self.pending.discard(agent.index)
            if not self.pending:
                self.done.set()

    def recheck(self) -> None:
        """Full pass (the condition itself may have changed, e.g. new expected serials)."""
        by_index = {agent.index: agent for agent in self.agents}
        for index in list(self.pending):
            self.check(by_index[index])


# --- progress --------------------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar on a terminal; elsewhere one line on stderr every few seconds."""

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._console = Console(file=stream, stderr=stream is sys.stderr)
        self._live = enabled and self._console.is_terminal
        self._enabled = enabled
        self._bars: dict[str, Any] = {}
        self._last_line = 0.0
        self._values: dict[str, tuple[int, int]] = {}
        self._progress = (
            Progress(
                TextColumn("{task.description:<16}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self._console,
                auto_refresh=False,  # refreshed from the event loop: no thread
                transient=False,
            )
            if self._live
            else None
        )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
        elif self._values:
            self._print_line()

    def update(self, name: str, done: int, total: int) -> None:
        self._values[name] = (done, total)
        if self._progress is not None:
            if name not in self._bars:
                self._bars[name] = self._progress.add_task(name, total=total)
            self._progress.update(self._bars[name], completed=done, total=total)

    def refresh(self, *, force: bool = False) -> None:
        if not self._enabled:
            return
        if self._progress is not None:
            self._progress.refresh()
            return
        now = time.monotonic()
        if force or now - self._last_line >= 5.0:
            self._last_line = now
            self._print_line()

    def _print_line(self) -> None:
        parts = [f"{name} {done}/{total}" for name, (done, total) in self._values.items()]
        self._console.print("simulate: " + ", ".join(parts), highlight=False)


# --- the fleet ---------------------------------------------------------------------------------------------


class Fleet:
    """N simulated agents on the running event loop."""

    def __init__(
        self, plan: FleetPlan, settings: AgentSettings, *, progress: _Progress | None = None
    ) -> None:
        self.plan = plan
        # Facts never change in a simulation: look at them once an hour, not every few seconds.
        self.settings = settings.model_copy(
            update={
                "facts_check_s": max(settings.facts_check_s, FACTS_CHECK_S),
                "location_check_s": max(settings.location_check_s, FACTS_CHECK_S),
                "facts_file": None,
            }
        )
        self.progress = progress or _Progress(sys.stderr, enabled=False)
        self.stats = FleetStats()
        self.rng = random.Random(plan.seed)
        self.pacer = Pacer(plan.connect_rate, jitter_s=plan.jitter_s, rng=self.rng)
        self._transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(
                max_connections=plan.http_connections, max_keepalive_connections=plan.http_connections
            )
        )
        self.http = httpx.AsyncClient(
            transport=self._transport, timeout=httpx.Timeout(settings.request_timeout_s, pool=None)
        )
        self.http_slots = asyncio.Semaphore(plan.http_connections)
        self._admin: httpx.AsyncClient | None = None
        self.agents: list[AnyAgent] = []
        self._waits: list[_Wait] = []
        self._facts: dict[int, HostFacts] = {}
        self._config_heads: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.stop_event = asyncio.Event()
        self.timings: dict[str, float] = {}
        self.enrolled_new = 0
        self.reused = 0
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.rss_start = rss_bytes()
        self.rss_ready = 0
        self.current_known: dict[DocumentKey, int] = {}

    # --- plumbing shared by agents -------------------------------------------------------------------

    def facts_of_site(self, site: int) -> HostFacts:
        if site not in self._facts:
            extra = {SITE_FACT: site_name(site)} if site else {}
            self._facts[site] = HostFacts(extra=extra)
        return self._facts[site]

    def config_head(self, prefix: str) -> str:
        if prefix not in self._config_heads:
            self._config_heads[prefix] = all_configs_filter(prefix).removesuffix("#")
        return self._config_heads[prefix]

    def poke(self, agent: _Timestamps) -> None:
        for wait in self._waits:
            wait.check(agent)

    def admin(self) -> httpx.AsyncClient:
        """The admin API (its own connection: never queued behind the agents' heartbeats)."""
        if not self.plan.admin_key:
            raise RuntimeError("this needs the manager's admin API (--admin-key)")
        if self._admin is None:
            self._admin = httpx.AsyncClient(
                base_url=f"{normalize_server(self.plan.server)}/api/v1",
                headers={"Authorization": f"Bearer {self.plan.admin_key}"},
                timeout=30.0,
            )
        return self._admin

    # --- enrolment ----------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Load or enrol the agents' identities, then build the agents (nothing runs yet)."""
        began = time.monotonic()
        plan = self.plan
        known = load_identities(plan.identities)
        self.reused = min(len(known), plan.agents)
        wanted = plan.agents - self.reused
        enrolled: list[SimIdentity] = []
        if wanted > 0 or plan.admin_key:
            tokens = await self._tokens(range(self.reused, plan.agents))
            enrolled = await self._enrol(range(self.reused, plan.agents), tokens)
        self.enrolled_new = len(enrolled)
        if plan.identities is not None and enrolled:
            save_identities(plan.identities, plan.server, [*known, *enrolled])
        chosen = [*known[: self.reused], *enrolled]
        self.timings["enrol_s"] = round(time.monotonic() - began, 3)
        began = time.monotonic()
        if self.plan.bare:
            keys = await self._bare_keys(chosen)
            self.agents = [BareAgent(self, i, sim, keys[i]) for i, sim in enumerate(chosen)]
        else:
            self.agents = [SimAgent(self, index, sim) for index, sim in enumerate(chosen)]
        self.timings["build_s"] = round(time.monotonic() - began, 3)

    async def _bare_keys(self, chosen: Sequence[SimIdentity]) -> list[DocumentKey]:
        """The (group, location) each agent would be in: its group, and the location of its site."""
        admin = self.admin()
        by_group: dict[int, dict[str, int]] = {}
        for group_id in sorted({sim.identity.group_id for sim in chosen}):
            locations = _ok(await admin.get(f"/groups/{group_id}/locations"))
            names = {loc["name"]: int(loc["id"]) for loc in locations}
            names[""] = next(int(loc["id"]) for loc in locations if loc["is_default"])
            by_group[group_id] = names
        keys = []
        for sim in chosen:
            names = by_group[sim.identity.group_id]
            site = site_name(sim.site) if sim.site else ""
            keys.append((sim.identity.group_id, names.get(site, names[""])))
        return keys

    async def _tokens(self, indices: range) -> list[str]:
        """A token per agent to enrol: the given ones in turn, or one per group made by the admin API."""
        plan = self.plan
        if plan.tokens:
            return [plan.tokens[i % len(plan.tokens)] for i in indices]
        admin = self.admin()
        group_ids = await prepare_groups(admin, plan)
        if not indices:
            return []
        per_group = Counter(i % len(group_ids) for i in indices)
        by_group: dict[int, str] = {}
        for slot, count in per_group.items():
            response = await admin.post(
                f"/groups/{group_ids[slot]}/enrollment-tokens",
                json={"max_uses": count, "expires_in_s": 86400},
            )
            _check(response)
            by_group[slot] = response.json()["token"]
        return [by_group[i % len(group_ids)] for i in indices]

    async def _enrol(self, indices: range, tokens: list[str]) -> list[SimIdentity]:
        plan = self.plan
        server = normalize_server(plan.server)
        results: dict[int, SimIdentity] = {}
        limit = asyncio.Semaphore(plan.enrol_concurrency)
        transport = _KeepOpen(self._transport)
        total = len(indices)

        async def one(index: int, token: str) -> None:
            site = plan.site_of(index)
            hostname = f"{plan.group_prefix}-agent-{index + 1:05d}"
            facts = {"simulated": True, SITE_FACT: site_name(site) if site else None}
            async with limit:
                for attempt in range(5):
                    try:
                        response = await ManagerClient.enroll(
                            server=server,
                            token=token,
                            hostname=hostname,
                            facts=facts,
                            timeout_s=self.settings.request_timeout_s,
                            transport=transport,
                        )
                        break
                    except ManagerError as exc:
                        if attempt == 4 or not _transient(exc):
                            raise
                        await asyncio.sleep(0.5 * 2**attempt)
            identity = Identity.from_enrollment(server=server, response=response, hostname=hostname)
            results[index] = SimIdentity(identity=identity, site=site)
            self.progress.update("enrolled", len(results), total)

        self.progress.update("enrolled", 0, total)
        await _gather_with_refresh(
            [one(index, token) for index, token in zip(indices, tokens, strict=True)], self.progress
        )
        return [results[i] for i in indices]

    # --- running -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every agent, `start_rate` per second; returns once all are started (not yet ready)."""
        began = time.monotonic()
        pacer = Pacer(self.plan.start_rate or self.plan.connect_rate, rng=self.rng)
        total = len(self.agents)
        loop = asyncio.get_running_loop()
        for number, agent in enumerate(self.agents, start=1):
            await pacer.wait()
            task = loop.create_task(agent.run(self.stop_event), name=f"agent-{agent.index}")
            self._tasks.append(task)
            if number % 100 == 0 or number == total:
                self.progress.update("started", number, total)
                self.progress.update("push sessions", self.push_sessions, self.push_wanted or 1)
                self.progress.update("documents", self.documents, total)
                self.progress.refresh()
        self.timings["start_s"] = round(time.monotonic() - began, 3)

    def _ready(self, agent: AnyAgent) -> bool:
        return agent.has_document and (agent.mode != "push" or agent.push_session)

    async def wait_ready(self, timeout_s: float) -> bool:
        """Until every agent holds a document and every push agent has its session up."""
        began = time.monotonic()
        wait = self._watch(self.agents, self._ready)
        try:
            deadline = time.monotonic() + timeout_s
            while not wait.done.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wait.done.wait(), timeout=0.5)
                self.progress.update("documents", self.documents, len(self.agents))
                self.progress.update("push sessions", self.push_sessions, self.push_wanted or 1)
                self.progress.refresh()
        finally:
            self._unwatch(wait)
        self.timings["ready_s"] = round(time.monotonic() - began, 3)
        self.ready_at = time.time()
        self.rss_ready = rss_bytes()
        return wait.done.is_set()

    async def stop(self, timeout_s: float = 60.0) -> None:
        """Stop every agent (push sessions end cleanly) and close the pool."""
        self.stop_event.set()
        failed = [task for task in self._tasks if task.done() and not task.cancelled() and task.exception()]
        for task in failed[:5]:
            log.error("%s ended early", task.get_name(), exc_info=task.exception())
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self.http.aclose()
        if self._admin is not None:
            await self._admin.aclose()

    # --- what the fleet holds ----------------------------------------------------------------------

    @property
    def documents(self) -> int:
        return sum(1 for agent in self.agents if agent.has_document)

    @property
    def push_wanted(self) -> int:
        return sum(1 for agent in self.agents if agent.mode == "push")

    @property
    def push_sessions(self) -> int:
        return sum(1 for agent in self.agents if agent.push_session)

    def serial_distribution(self) -> dict[str, dict[str, int]]:
        spread: dict[str, Counter[int]] = defaultdict(Counter)
        for agent in self.agents:
            key = agent.key
            spread[key_text(key) if key else "none"][agent.serial] += 1
        return {key: {str(s): n for s, n in sorted(c.items())} for key, c in sorted(spread.items())}

    async def current_serials(self) -> dict[DocumentKey, int]:
        """The current serial of each (group, location) agents hold: from the admin API when possible,
        else the highest serial any agent holds for it."""
        keys = {agent.key for agent in self.agents if agent.key is not None}
        if self.plan.admin_key:
            current: dict[DocumentKey, int] = {}
            admin = self.admin()
            for group_id, location_id in sorted(keys):
                response = await admin.get(f"/groups/{group_id}/locations/{location_id}/effective")
                _check(response)
                current[(group_id, location_id)] = int(orjson.loads(response.content)["doc"]["serial"])
            self.current_known = current
            return current
        best: dict[DocumentKey, int] = {}
        for agent in self.agents:
            if agent.key is not None:
                best[agent.key] = max(best.get(agent.key, NO_SERIAL), agent.serial)
        return best

    def converged(self, serials: dict[DocumentKey, int]) -> Predicate:
        def holds(agent: AnyAgent) -> bool:
            key = agent.key
            return key is not None and key in serials and agent.serial >= serials[key]

        return holds

    # --- waits (for benchmarks) ----------------------------------------------------------------------

    def _watch(self, agents: Sequence[AnyAgent], predicate: Predicate) -> _Wait:
        wait = _Wait(agents, predicate)
        self._waits.append(wait)
        return wait

    def _unwatch(self, wait: _Wait) -> None:
        with contextlib.suppress(ValueError):
            self._waits.remove(wait)

    async def _wait(
        self,
        agents: Sequence[AnyAgent],
        predicate: Predicate,
        timeout_s: float,
        *,
        recheck: Callable[[], Awaitable[Predicate | None]] | None = None,
    ) -> _Wait:
        wait = self._watch(agents, predicate)
        deadline = time.monotonic() + timeout_s
        try:
            while not wait.done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wait.done.wait(), timeout=min(remaining, 2.0))
                if not wait.done.is_set() and recheck is not None:
                    changed = await recheck()
                    if changed is not None:
                        wait.predicate = changed
                        wait.recheck()
        finally:
            self._unwatch(wait)
        return wait

    async def wait_converged(
        self, serials: dict[DocumentKey, int] | None, *, since: float | None, timeout_s: float
    ) -> dict[str, Any]:
        """Until every agent holds the current serial of its (group, location) or a later one.

        `serials`: the expected serials (else asked of the manager, and asked again while waiting, so
        that agents that move location are judged by their new location's document). Latencies are
        measured from `since` to the moment each agent first applied its expected serial.
        """
        began = time.monotonic()
        fixed = serials is not None
        expected = serials if serials is not None else await self.current_serials()

        async def refresh() -> Predicate | None:
            if fixed:
                return None
            expected.update(await self.current_serials())
            return self.converged(expected)

        wait = await self._wait(self.agents, self.converged(expected), timeout_s, recheck=refresh)
        latencies: list[float] = []
        by_key: dict[str, list[float]] = defaultdict(list)
        if since is not None:
            for agent in self.agents:
                key = agent.key
                at = agent.applied_at(expected[key]) if key in expected and key is not None else None
                if at is not None and key is not None and agent.index not in wait.pending:
                    latencies.append(at - since)
                    by_key[key_text(key)].append(at - since)
        return {
            "ok": wait.done.is_set(),
            "agents": len(self.agents),
            "converged": len(self.agents) - len(wait.pending),
            "expected_serials": {key_text(k): v for k, v in sorted(expected.items())},
            "latency_s": percentiles(latencies) if since is not None else None,
            "latency_by_key_s": {k: [round(min(v), 3), round(max(v), 3)] for k, v in sorted(by_key.items())},
            "waited_s": round(time.monotonic() - began, 3),
        }

    async def wait_messages(self, *, since: float, timeout_s: float) -> dict[str, Any]:
        """Until every push agent has handled a config message after `since` (a baseline's fan-out)."""
        began = time.monotonic()
        push = [agent for agent in self.agents if agent.mode == "push"]
        wait = await self._wait(push, lambda agent: agent.config_at >= since, timeout_s)
        latencies = [agent.config_at - since for agent in push if agent.config_at >= since]
        return {
            "ok": wait.done.is_set(),
            "agents": len(push),
            "received": len(push) - len(wait.pending),
            "latency_s": percentiles(latencies),
            "waited_s": round(time.monotonic() - began, 3),
        }

    async def wait_sessions(
        self, *, since: float, timeout_s: float, serials: dict[DocumentKey, int] | None = None
    ) -> dict[str, Any]:
        """Until every push agent has a session that came up after `since` and, with `serials`, holds
        its expected serial. Times run from `since` to the later of both, per agent."""
        began = time.monotonic()
        push = [agent for agent in self.agents if agent.mode == "push"]
        holds = self.converged(serials) if serials is not None else (lambda agent: True)

        def back(agent: AnyAgent) -> bool:
            if isinstance(agent, BareAgent):  # no serial to hold: the session is all
                return agent.push_session and agent.session_at >= since
            return agent.push_session and agent.session_at >= since and holds(agent)

        wait = await self._wait(push, back, timeout_s)
        stuck = [
            {
                "index": agent.index,
                "transport": agent.transport,
                "session_at": agent.session_at,
                "config_at": agent.config_at,
                "key": key_text(agent.key) if agent.key else None,
                "serial": agent.serial,
            }
            for agent in push
            if agent.index in wait.pending
        ][:5]
        times: list[float] = []
        sessions: list[float] = []  # the session alone, and the serial alone: which one kept an agent
        serials_at: list[float] = []
        for agent in push:
            if agent.index in wait.pending:
                continue
            at = agent.session_at
            sessions.append(at - since)
            key = agent.key
            if serials is not None and key is not None and not isinstance(agent, BareAgent):
                applied = agent.applied_at(serials[key])
                held_since = applied if applied is not None else since
                serials_at.append(held_since - since)
                at = max(at, held_since)
            times.append(at - since)
        return {
            "ok": wait.done.is_set(),
            "agents": len(push),
            "back": len(push) - len(wait.pending),
            "time_s": percentiles(times),
            "session_s": percentiles(sessions),
            "serial_s": percentiles(serials_at) if serials_at else None,
            "not_back_sample": stuck,
            "config_message_since": sum(1 for agent in push if agent.config_at >= since),
            "waited_s": round(time.monotonic() - began, 3),
        }

    # --- the summary ---------------------------------------------------------------------------------------

    def change_latencies(self) -> dict[str, float | int] | None:
        """For documents issued after the fleet was ready: from `issued_at` to each agent's apply."""
        if self.ready_at is None:
            return None
        values = [
            applied - issued
            for agent in self.agents
            if isinstance(agent, SimAgent)
            for _, applied, issued in agent.applied[-1:]
            if issued > self.ready_at
        ]
        return percentiles(values) if values else None

    def summary(self) -> dict[str, Any]:
        modes = Counter(agent.mode for agent in self.agents if agent.has_document)
        current = self.current_known or {}
        holds = self.converged(current) if current else None
        now_rss = rss_bytes()
        agents = len(self.agents)
        return {
            "agents": agents,
            "plan": {
                "mode": self.plan.mode,
                "groups": len(self.plan.tokens) or self.plan.groups,
                "locations": self.plan.locations,
                "connect_rate": self.plan.connect_rate,
                "start_rate": self.plan.start_rate or self.plan.connect_rate,
                "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            },
            "enrolled_now": self.enrolled_new,
            "reused_identities": self.reused,
            "timings": self.timings,
            "documents": self.documents,
            "modes": dict(modes),
            "push_sessions": self.push_sessions,
            "serials": self.serial_distribution(),
            "current_serials": {key_text(k): v for k, v in sorted(current.items())} or None,
            "converged": sum(1 for a in self.agents if holds(a)) if holds else None,
            "change_latency_s": self.change_latencies(),
            "heartbeats": {
                "total": sum(self.stats.heartbeats.values()),
                "by_transport": dict(self.stats.heartbeats),
                "failures": self.stats.heartbeat_failures,
                "failure_kinds": dict(self.stats.heartbeat_failure_kinds),
            },
            "mqtt": {
                "connects": self.stats.connects,
                "connect_failures": self.stats.connect_failures,
                "sessions": sum(agent.sessions for agent in self.agents),
            },
            "rates": self.stats.rates(),
            "rss_bytes": {
                "start": self.rss_start,
                "ready": self.rss_ready,
                "now": now_rss,
                "per_agent": round((self.rss_ready - self.rss_start) / agents)
                if agents and self.rss_ready
                else None,
            },
        }


async def prepare_groups(admin: httpx.AsyncClient, plan: FleetPlan) -> list[int]:
    """Make sure the plan's groups exist under the root, own their settings (inheritance off, so that
    each may have its own mode) and have locations `site-1`.. with a condition on the `site` fact.

    Idempotent: a second run finds everything in place and changes nothing (no new serials).
    """
    groups = _ok(await admin.get("/groups"))
    root = next(g for g in groups if g["parent_id"] is None)
    by_name = {g["name"]: g for g in groups if g["parent_id"] == root["id"]}
    ids = []
    for index in range(plan.groups):
        name = plan.group_name(index)
        group = by_name.get(name)
        if group is None:
            group = _ok(
                await admin.post("/groups", json={"name": name, "parent_id": root["id"], "inherit": False})
            )
        elif group["inherit"]:
            group = _ok(await admin.patch(f"/groups/{group['id']}", json={"inherit": False}))
        group_id = int(group["id"])
        ids.append(group_id)
        locations = {loc["name"]: loc for loc in _ok(await admin.get(f"/groups/{group_id}/locations"))}
        for site in range(1, plan.locations):
            conditions = [
                {"type": "fact", "name": SITE_FACT, "equals": site_name(site), "weight": SITE_WEIGHT}
            ]
            if site_name(site) not in locations:
                _ok(
                    await admin.post(
                        f"/groups/{group_id}/locations",
                        json={"name": site_name(site), "conditions": conditions},
                    )
                )
        communication = _ok(await admin.get(f"/groups/{group_id}/communication"))
        wanted: dict[str, Any] = {"mode": plan.mode_of_group(index)}
        if plan.heartbeat_s is not None:
            wanted["heartbeat_s"] = plan.heartbeat_s
        if any(communication.get(k) != v for k, v in wanted.items()):
            _ok(await admin.put(f"/groups/{group_id}/communication", json=wanted))
    return ids


def _ok(response: httpx.Response) -> Any:
    _check(response)
    return response.json() if response.content else None


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: HTTP {response.status_code}: "
            f"{response.text[:300]}"
        )


def _transient(exc: ManagerError) -> bool:
    return isinstance(exc, ManagerUnreachable)


async def _gather_with_refresh(work: Sequence[Awaitable[None]], progress: _Progress) -> None:
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_EXCEPTION)
            progress.refresh()
            for task in done:
                task.result()  # raises the first failure
    finally:
        for task in tasks:
            task.cancel()


# --- the command -------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    duration_s: float | None = None
    """Stop this long after the fleet is ready (None: until SIGINT/SIGTERM, or `stop` in control mode)."""
    control: bool = False
    summary_path: Path | None = None
    progress: bool = True
    enrol_only: bool = False
    """Enrol (and keep the identities), then stop: the broker provisions accounts before a real run."""


def run(plan: FleetPlan, settings: AgentSettings, options: RunOptions) -> dict[str, Any]:
    """Run the simulation on a fresh event loop; returns the summary (also written as asked)."""
    raise_fd_limit()
    cache_missing_sniffio()
    runner = _loop_factory(plan.loop)
    with asyncio.Runner(loop_factory=runner) as loop_runner:
        return loop_runner.run(_main(plan, settings, options))


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


async def _main(plan: FleetPlan, settings: AgentSettings, options: RunOptions) -> dict[str, Any]:
    out = sys.stdout
    with _Progress(sys.stderr, enabled=options.progress) as progress:
        fleet = Fleet(plan, settings, progress=progress)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fleet.stop_event.set)
        try:
            await fleet.prepare()
            if options.enrol_only:
                return {
                    "agents": len(fleet.agents),
                    "enrolled_now": fleet.enrolled_new,
                    "reused_identities": fleet.reused,
                    "timings": fleet.timings,
                }
            await fleet.start()
            ready = await fleet.wait_ready(plan.ready_timeout_s)
            # Everything built so far lives as long as the fleet: keep the collector from walking it.
            gc.collect()
            gc.freeze()
            progress.refresh(force=True)
            if plan.admin_key:
                await fleet.current_serials()
            if not ready:
                log.warning("not every agent was ready within %.0f s", plan.ready_timeout_s)
            if options.control:
                _emit(out, {"event": "ready", "ok": ready, **fleet.summary()})
                await _control(fleet, out)
            else:
                await _run_until(fleet, options.duration_s)
            if plan.admin_key:
                with contextlib.suppress(httpx.HTTPError, RuntimeError):
                    await fleet.current_serials()
            summary = {"ready": ready, **fleet.summary()}
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await fleet.stop()
    if options.summary_path is not None:
        options.summary_path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if options.control:
        _emit(out, {"event": "stopped", **summary})
    return summary


async def _run_until(fleet: Fleet, duration_s: float | None) -> None:
    limit = None if duration_s is None else time.monotonic() + duration_s
    while not fleet.stop_event.is_set():
        wait = 1.0 if limit is None else min(1.0, limit - time.monotonic())
        if wait <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fleet.stop_event.wait(), timeout=wait)
        fleet.progress.update("push sessions", fleet.push_sessions, fleet.push_wanted or 1)
        fleet.progress.refresh()


def _emit(out: TextIO, event: dict[str, Any]) -> None:
    out.write(orjson.dumps(event).decode() + "\n")
    out.flush()


def _serials(value: Any) -> dict[DocumentKey, int] | None:
    if value is None:
        return None
    return {parse_key(k): int(v) for k, v in value.items()}


async def _control(fleet: Fleet, out: TextIO) -> None:
    """Serve JSON-line requests from stdin until `stop`, end of input, or a signal.

    Requests: {"op": "summary"} | {"op": "wait_converged", "serials"?: {"g/l": n}, "since"?: t,
    "timeout_s": s} | {"op": "wait_messages", "since": t, "timeout_s": s} | {"op": "wait_sessions",
    "since": t, "timeout_s": s, "serials"?: {...}} | {"op": "rates", "since"?: t, "until"?: t} |
    {"op": "stop"}. Each gets one JSON line back: {"event": <op>, ...}; a bad request gets
    {"event": "error", "detail": ...}. Times are wall-clock seconds (`time.time()`).
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stopped = asyncio.ensure_future(fleet.stop_event.wait())
    try:
        while True:
            line_task = asyncio.ensure_future(reader.readline())
            await asyncio.wait({line_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not line_task.done():
                line_task.cancel()
                return
            line = line_task.result()
            if not line:
                return
            try:
                request = orjson.loads(line)
                op = request["op"]
                if op == "stop":
                    return
                _emit(out, {"event": op, **await _serve(fleet, op, request)})
            except Exception as exc:
                _emit(out, {"event": "error", "detail": f"{type(exc).__name__}: {exc}"})
    finally:
        stopped.cancel()


async def _serve(fleet: Fleet, op: str, request: dict[str, Any]) -> dict[str, Any]:
    timeout_s = float(request.get("timeout_s", 60.0))
    since = request.get("since")
    if op == "summary":
        if fleet.plan.admin_key and request.get("refresh", True):
            await fleet.current_serials()
        return fleet.summary()
    if op == "wait_converged":
        return await fleet.wait_converged(_serials(request.get("serials")), since=since, timeout_s=timeout_s)
    if op == "wait_messages":
        return await fleet.wait_messages(since=float(request["since"]), timeout_s=timeout_s)
    if op == "wait_sessions":
        return await fleet.wait_sessions(
            since=float(request["since"]), timeout_s=timeout_s, serials=_serials(request.get("serials"))
        )
    if op == "rates":
        return fleet.stats.rates(since=since, until=request.get("until"))
    if op == "collect":
        gc.collect()
        return {"rss_bytes": rss_bytes()}
    raise ValueError(f"unknown op {op!r}")
