"""Anti-entropy: repair push agents that a lost message left behind, on every broker engine.

A retained document can be lost on its way: a broker node killed after it acknowledged a publish but
before it stored it, an update that another node of a cluster does not show for seconds, a QoS 0
delivery (NATS) dropped with a connection. The manager knows the serial each agent holds (its state
reports and heartbeats, in the agents table), so the lease-holding bridge looks, every
`anti_entropy_s`, for online push agents still behind the document of their (group, location) once
`anti_entropy_grace_s` has passed since that document was published, and repairs them in two steps:

1. it publishes the topic's retained document again, which reaches every subscriber of the topic at
   once: one message repairs every agent that missed it;
2. an agent still behind one grace later is nudged: an `update_now` command on its cmd topic makes it
   heartbeat, and the heartbeat answers the document over HTTPS. Nudges back off per agent (doubling,
   up to `MAX_NUDGE_INTERVAL_S`) and at most `max_nudges` go out per round, so that a fleet-wide loss
   becomes a steady trickle of heartbeats, not a storm on the manager.

Every `republish_all_s` it also republishes every document, for whatever the state reports cannot
show (a node that came back with an old retained store, agents that never reported). The next regular
heartbeat stays the backstop of it all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sqlalchemy import Engine, text

from broker_bridge.broker import Publication
from broker_bridge.relay import Publisher, republish_current
from fabric_core.canonical import canonical_json
from fabric_core.topics import cmd_topic
from fabric_core.wire import AgentCommand
from manager_db.models import utcnow

log = logging.getLogger(__name__)

MAX_NUDGE_INTERVAL_S = 60.0
PUBLISH_TIMEOUT_S = 10.0

Topic = tuple[int, int]
"""(group id, location id) of a config topic."""

_DOCUMENTS = text("SELECT group_id, location_id, serial, is_default FROM effective_configs")
# Only online agents behind the newest document of their group can be behind their own: the exact
# (group, location) match is made in Python, where an unknown location means the group's default.
_BEHIND = text(
    "SELECT a.id, a.group_id, a.location_id, a.serial FROM agents a "
    "WHERE a.online = :online AND a.revoked_at IS NULL "
    "AND a.serial < (SELECT MAX(e.serial) FROM effective_configs e WHERE e.group_id = a.group_id) "
    "LIMIT :limit"
)


@dataclass(frozen=True, slots=True)
class Documents:
    """The current serial of every (group, location), and each group's default location."""

    serials: dict[Topic, int]
    defaults: dict[int, int]

    def topic_of(self, group_id: int, location_id: int | None) -> Topic | None:
        if location_id is not None and (group_id, location_id) in self.serials:
            return group_id, location_id
        default = self.defaults.get(group_id)
        return None if default is None else (group_id, default)


@dataclass(slots=True)
class _Straggler:
    serial: int
    """The serial it should reach."""
    since: float
    next_nudge: float
    nudges: int = 0


@dataclass
class RepairRound:
    """What one round found and did (for logs and tests)."""

    behind: int = 0
    republished: list[Topic] = field(default_factory=list)
    nudged: list[str] = field(default_factory=list)


class AntiEntropy:
    """The repair loop's memory between rounds: when each topic was last published, who lags."""

    def __init__(
        self,
        *,
        prefix: str,
        interval_s: float,
        grace_s: float,
        republish_all_s: float,
        max_nudges: int = 1000,
        scan_limit: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.republish_all_s = republish_all_s
        self.max_nudges = max_nudges
        self.scan_limit = scan_limit
        self._clock = clock
        self._started = clock()
        self._published: dict[Topic, float] = {}
        self._stragglers: dict[str, _Straggler] = {}
        self._next_round = 0.0
        self._next_full = self._started + republish_all_s
        self.rounds = 0
        self.repaired_topics = 0
        self.nudges = 0

    def note_published(self, topics: Iterable[Topic]) -> None:
        """The relay published these topics now: their agents get a grace from now on."""
        now = self._clock()
        for topic in topics:
            self._published[topic] = now

    def due(self) -> bool:
        return self._clock() >= self._next_round

    def run_round(self, engine: Engine, publisher: Publisher) -> RepairRound:
        """Find the agents behind, republish their topics, nudge those still behind after that."""
        now = self._clock()
        self._next_round = now + self.interval_s
        result = RepairRound()
        if now >= self._next_full:
            self._next_full = now + self.republish_all_s
            count = len(self._republish(engine, publisher, None, now))
            log.info("anti-entropy: republished all %d current document(s)", count)
        documents, behind = self._read(engine)
        result.behind = len(behind)
        lagging: dict[str, _Straggler] = {}
        stale_topics: dict[Topic, int] = {}
        for agent_id, group_id, location_id, serial in behind:
            topic = documents.topic_of(group_id, location_id)
            if topic is None or serial >= documents.serials[topic]:
                continue
            target = documents.serials[topic]
            known = self._stragglers.get(agent_id)
            if known is None or known.serial != target:
                if now - self._published.get(topic, self._started) < self.grace_s:
                    continue  # published (or republished) just now: let it arrive
                known = _Straggler(target, since=now, next_nudge=now + self.grace_s)
                stale_topics[topic] = stale_topics.get(topic, 0) + 1
            lagging[agent_id] = known
        self._stragglers = lagging  # who caught up (or went offline) is forgotten
        if stale_topics:
            result.republished = self._republish(engine, publisher, list(stale_topics), now)
        result.nudged = self._nudge(publisher, now)
        if result.republished or result.nudged:
            log.info(
                "anti-entropy: %d agent(s) behind; republished %d document(s), nudged %d agent(s)",
                result.behind,
                len(result.republished),
                len(result.nudged),
            )
        self.rounds += 1
        return result

    def _read(self, engine: Engine) -> tuple[Documents, list[tuple[str, int, int | None, int]]]:
        with engine.connect() as connection:
            serials: dict[Topic, int] = {}
            defaults: dict[int, int] = {}
            for group_id, location_id, serial, is_default in connection.execute(_DOCUMENTS):
                serials[(group_id, location_id)] = serial
                if is_default:
                    defaults[group_id] = location_id
            rows = connection.execute(_BEHIND, {"online": True, "limit": self.scan_limit}).all()
        return Documents(serials, defaults), [(r[0], r[1], r[2], r[3]) for r in rows]

    def _republish(
        self, engine: Engine, publisher: Publisher, topics: list[Topic] | None, now: float
    ) -> list[Topic]:
        """Publish the current documents of `topics` (None: all) again, retained."""
        done = republish_current(
            engine, publisher, prefix=self.prefix, timeout=PUBLISH_TIMEOUT_S, only=topics
        )
        for topic in done:
            self._published[topic] = now
        if topics is not None:
            self.repaired_topics += len(done)
        return done

    def _nudge(self, publisher: Publisher, now: float) -> list[str]:
        due = [agent_id for agent_id, s in self._stragglers.items() if s.next_nudge <= now]
        due = due[: self.max_nudges]
        if not due:
            return []
        issued = utcnow()
        messages = []
        for agent_id in due:
            straggler = self._stragglers[agent_id]
            command = AgentCommand(
                command="update_now", id=f"nudge-{straggler.serial}-{straggler.nudges}", issued_at=issued
            )
            payload = canonical_json(command.model_dump(mode="json", exclude_none=True))
            messages.append(Publication(cmd_topic(self.prefix, agent_id), payload, 1, False))
            straggler.nudges += 1
            straggler.next_nudge = now + min(MAX_NUDGE_INTERVAL_S, self.grace_s * 2**straggler.nudges)
        publisher.publish_many(messages, timeout=PUBLISH_TIMEOUT_S)
        self.nudges += len(due)
        return due
