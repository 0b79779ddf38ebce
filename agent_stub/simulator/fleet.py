"""The fleet: N simulated agents on the running event loop, what they share, and what they hold.

`SimulatedFleet` builds the agents (identities kept from an earlier run, or enrolled: `enrol`, `admin`),
starts them at `start_rate`, waits until every one holds a document and every push agent has its
session, and stops them cleanly. What agents share lives here: the settings, one `httpx.AsyncClient`
pool (with a FIFO of its connections, `http_slots`) that trusts the manager's CA, pinned once for the
whole fleet (`pinning`), the connect `Pacer`, the counters, the facts of
each site. Benchmarks watch the agents through `watch`/`wait_for` (`agent_stub.simulator.waits`): every
agent pokes the fleet when something happens to it, and only that agent is checked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

from agent_stub.facts import HostFacts
from agent_stub.manager_client import normalize_server
from agent_stub.measure import percentiles, rss_bytes
from agent_stub.simulator import admin as admin_api
from agent_stub.simulator import pinning
from agent_stub.simulator.agents import AnyAgent, BareAgent, Pacer, SimAgent, Timestamps
from agent_stub.simulator.enrol import enrol
from agent_stub.simulator.plan import (
    SITE_FACT,
    DocumentKey,
    FleetPlan,
    SimIdentity,
    key_text,
    load_identities,
    save_identities,
    site_name,
)
from agent_stub.simulator.stats import FleetStats, Progress
from agent_stub.trust import context_for
from fabric_core.serials import NO_SERIAL
from fabric_core.settings import AgentSettings, MqttAddress
from fabric_core.topics import all_configs_filter

log = logging.getLogger(__name__)

FACTS_CHECK_S = 3600.0
"""Simulated facts never change: no agent needs to look again soon (each look is a thread hop)."""

Predicate = Callable[[Any], bool]


class Wait:
    """Agents still short of a condition; re-checked for one agent whenever something happens to it."""

    def __init__(self, agents: Sequence[AnyAgent], predicate: Predicate) -> None:
        self.predicate = predicate
        self.agents = list(agents)
        self.pending = {agent.index for agent in agents if not predicate(agent)}
        self.done = asyncio.Event()
        if not self.pending:
            self.done.set()

    def check(self, agent: Timestamps) -> None:
        if agent.index in self.pending and self.predicate(agent):
            self.pending.discard(agent.index)
            if not self.pending:
                self.done.set()

    def recheck(self) -> None:
        """Full pass (the condition itself may have changed, e.g. new expected serials)."""
        by_index = {agent.index: agent for agent in self.agents}
        for index in list(self.pending):
            self.check(by_index[index])


class SimulatedFleet:
    """N simulated agents on the running event loop."""

    def __init__(self, plan: FleetPlan, settings: AgentSettings, *, progress: Progress | None = None) -> None:
        self.plan = plan
        # Facts never change in a simulation: look at them once an hour, not every few seconds.
        self.settings = settings.model_copy(
            update={
                "facts_check_s": max(settings.facts_check_s, FACTS_CHECK_S),
                "location_check_s": max(settings.location_check_s, FACTS_CHECK_S),
                "facts_file": None,
            }
        )
        self.progress = progress or Progress(sys.stderr, enabled=False)
        self.stats = FleetStats()
        self.rng = random.Random(plan.seed)
        self.pacer = Pacer(plan.connect_rate, jitter_s=plan.jitter_s, rng=self.rng)
        self.broker_override: tuple[MqttAddress, ...] = tuple(
            MqttAddress.parse(url.strip()) for url in (plan.mqtt_url or "").split(",") if url.strip()
        )
        """The broker nodes every agent's links use instead of their credentials' (`plan.mqtt_url`)."""
        self._transport, self.http = self._pool(None)
        self.trusted_cas: list[str] = []
        """The CAs the fleet's pool trusts, pinned once (`pinning`): one manager, one CA."""
        self._admin_trust: list[str] = []
        self.http_slots = asyncio.Semaphore(plan.http_connections)
        self._admin: httpx.AsyncClient | None = None
        self.agents: list[AnyAgent] = []
        self._waits: list[Wait] = []
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

    def _pool(self, context: ssl.SSLContext | None) -> tuple[httpx.AsyncHTTPTransport, httpx.AsyncClient]:
        """The agents' one connection pool; over https:// it trusts `context` (the pinned CA)."""
        size = self.plan.http_connections
        transport = httpx.AsyncHTTPTransport(
            verify=context or True,
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
        )
        timeout = httpx.Timeout(self.settings.request_timeout_s, pool=None)
        return transport, httpx.AsyncClient(transport=transport, timeout=timeout)

    async def _trust(self, cas: list[str]) -> None:
        """Make the pool trust `cas` (before any agent uses it)."""
        self.trusted_cas = cas
        if cas:
            await self.http.aclose()
            self._transport, self.http = self._pool(context_for(cas))

    def facts_of_site(self, site: int) -> HostFacts:
        if site not in self._facts:
            extra = {SITE_FACT: site_name(site)} if site else {}
            self._facts[site] = HostFacts(extra=extra)
        return self._facts[site]

    def config_head(self, prefix: str) -> str:
        if prefix not in self._config_heads:
            self._config_heads[prefix] = all_configs_filter(prefix).removesuffix("#")
        return self._config_heads[prefix]

    def poke(self, agent: Timestamps) -> None:
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
                verify=context_for(self._admin_trust) or True,  # --ca-file, or the CA --ca-hash pins
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
        timeout_s = self.settings.request_timeout_s
        self._admin_trust = await pinning.initial_trust(plan, timeout_s=timeout_s)
        tokens: list[str] = []
        if wanted > 0 or plan.admin_key:
            tokens = await self._tokens(range(self.reused, plan.agents))
        bare_tokens, trusted = await pinning.fleet_trust(
            plan, tokens, initial=self._admin_trust, known=known[: self.reused], timeout_s=timeout_s
        )
        await self._trust(trusted)
        if tokens:
            enrolled = await enrol(
                plan,
                range(self.reused, plan.agents),
                bare_tokens,
                transport=self._transport,
                timeout_s=timeout_s,
                progress=self.progress,
                trusted_cas=trusted,
            )
        self.enrolled_new = len(enrolled)
        if plan.identities is not None and enrolled:
            save_identities(plan.identities, plan.server, [*known, *enrolled])
        chosen = [*known[: self.reused], *enrolled]
        self.timings["enrol_s"] = round(time.monotonic() - began, 3)
        began = time.monotonic()
        if self.plan.bare:
            keys = await admin_api.location_keys(self.admin(), chosen)
            self.agents = [BareAgent(self, i, sim, keys[i]) for i, sim in enumerate(chosen)]
        else:
            self.agents = [SimAgent(self, index, sim) for index, sim in enumerate(chosen)]
        self.timings["build_s"] = round(time.monotonic() - began, 3)

    async def _tokens(self, indices: range) -> list[str]:
        """A token per agent to enrol: the given ones in turn, or one per group made by the admin API."""
        plan = self.plan
        if plan.tokens:
            return [plan.tokens[i % len(plan.tokens)] for i in indices]
        return await admin_api.enrolment_tokens(self.admin(), plan, indices)

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
        wait = self.watch(self.agents, self._ready)
        try:
            deadline = time.monotonic() + timeout_s
            while not wait.done.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wait.done.wait(), timeout=0.5)
                self.progress.update("documents", self.documents, len(self.agents))
                self.progress.update("push sessions", self.push_sessions, self.push_wanted or 1)
                self.progress.refresh()
        finally:
            self.unwatch(wait)
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
            client = self.admin()
            for key in sorted(keys):
                current[key] = await admin_api.effective_serial(client, key)
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

    # --- watching agents (for benchmarks: `agent_stub.simulator.waits`) --------------------------------

    def watch(self, agents: Sequence[AnyAgent], predicate: Predicate) -> Wait:
        wait = Wait(agents, predicate)
        self._waits.append(wait)
        return wait

    def unwatch(self, wait: Wait) -> None:
        with contextlib.suppress(ValueError):
            self._waits.remove(wait)

    async def wait_for(
        self,
        agents: Sequence[AnyAgent],
        predicate: Predicate,
        timeout_s: float,
        *,
        recheck: Callable[[], Awaitable[Predicate | None]] | None = None,
    ) -> Wait:
        wait = self.watch(agents, predicate)
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
            self.unwatch(wait)
        return wait

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
