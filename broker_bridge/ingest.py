"""Agent state from the broker into the agents table: presence (last will), serial, location, mode.

Messages arrive on the broker's network thread; they are parsed and kept in memory, newest per agent,
and written in one batch per flush. A message that breaks the contract is logged and dropped. The
agents a flush found on a new serial go to `on_advances` once it committed (the convergence SLO).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import orjson
from pydantic import ValidationError
from sqlalchemy import Engine, text

from fabric_core.errors import InvalidTopic
from fabric_core.topics import AgentTopic, parse_topic
from fabric_core.wire import AgentStateReport
from manager_db.models import utcnow
from manager_db.sightings import Advance, record_sightings, sighting

log = logging.getLogger(__name__)
_PRESENCE = text("UPDATE agents SET online = :online WHERE id = :id AND revoked_at IS NULL")


@dataclass(frozen=True, slots=True)
class Seen:
    report: AgentStateReport
    at: datetime


class StateIngest:
    def __init__(
        self,
        *,
        prefix: str,
        on_advances: Callable[[list[Advance]], None] | None = None,
        on_message: Callable[[bool], None] | None = None,
    ) -> None:
        self.prefix = prefix
        self.on_advances = on_advances
        """Hears the advances of each committed flush (`manager_db.sightings.record_sightings`)."""
        self.on_message = on_message
        """Hears each state message: True taken in, False dropped (on the broker's network thread:
        it must be quick)."""
        self._pending: dict[str, Seen] = {}
        self._lock = threading.Lock()
        self.dropped = 0

    def handle(self, topic: str, payload: bytes) -> None:
        """The broker callback: validate, then remember the newest report per agent."""
        if not payload:
            return  # a cleared retained message (agent removed): nothing to record
        try:
            parsed = parse_topic(self.prefix, topic)
            if not isinstance(parsed, AgentTopic) or parsed.channel != "state":
                raise InvalidTopic(f"{topic!r} is not a state topic")
            report = AgentStateReport.model_validate(orjson.loads(payload))
            if report.agent_id != parsed.agent_id:
                raise ValueError(f"report names agent {report.agent_id!r} on {parsed.agent_id!r}'s topic")
        except (InvalidTopic, ValidationError, ValueError, orjson.JSONDecodeError) as exc:
            self.dropped += 1
            log.warning("dropped a state message on %s: %s", topic, exc)
            if self.on_message is not None:
                self.on_message(False)
            return
        with self._lock:
            self._pending[report.agent_id] = Seen(report, utcnow())
        if self.on_message is not None:
            self.on_message(True)

    def flush(self, engine: Engine) -> int:
        """Write what arrived since the last flush; return how many agents it touched."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        # Presence is the broker's to say (a last will says only "offline": what the agent reported
        # before stays). The other columns the api's heartbeat bookkeeping writes too: newer wins.
        # In id order, as `record_sightings` writes its rows: the rows are locked in one order.
        presence = [
            {"id": agent_id, "online": seen.report.online} for agent_id, seen in sorted(pending.items())
        ]
        sightings = [
            sighting(
                agent_id,
                seen=seen.at,  # the bridge's clock, not the agent's: agents' clocks drift
                serial=seen.report.serial,
                location_id=seen.report.location_id,
                mode=seen.report.mode,
            )
            for agent_id, seen in pending.items()
            if seen.report.online
        ]
        try:
            with engine.begin() as connection:
                connection.execute(_PRESENCE, presence)
                advances = record_sightings(connection, sightings)
        except Exception:
            with self._lock:
                for agent_id, seen in pending.items():
                    self._pending.setdefault(agent_id, seen)
            raise
        if advances and self.on_advances is not None:
            try:
                self.on_advances(advances)
            except Exception:  # the state is written; a listener's failure must not undo the flush
                log.exception("a listener of %d advance(s) failed", len(advances))
        return len(pending)
