"""Agent state from the broker into the agents table: presence (last will), serial, location, mode.

Messages arrive on the broker's network thread; they are parsed and kept in memory, newest per agent,
and written in one batch per flush. A message that breaks the contract is logged and dropped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

import orjson
from pydantic import ValidationError
from sqlalchemy import DateTime, Engine, bindparam, text

from manager_db.models import utcnow
from fabric_core.errors import InvalidTopic
from fabric_core.topics import AgentTopic, parse_topic
from fabric_core.wire import AgentStateReport

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Seen:
    report: AgentStateReport
    at: datetime


class StateIngest:
    def __init__(self, *, prefix: str) -> None:
        self.prefix = prefix
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
            return
        with self._lock:
            self._pending[report.agent_id] = Seen(report, utcnow())

    def flush(self, engine: Engine) -> int:
        """Write what arrived since the last flush; return how many agents it touched."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        online = [
            {
                "id": agent_id,
                "serial": seen.report.serial,
                "location_id": seen.report.location_id,
                "mode": seen.report.mode,
                "seen": seen.at,  # the bridge's clock, not the agent's: agents' clocks drift
            }
            for agent_id, seen in pending.items()
            if seen.report.online
        ]
        presence = [{"id": agent_id, "online": seen.report.online} for agent_id, seen in pending.items()]
        # Presence is the broker's to say (a last will says only "offline": what the agent reported
        # before stays). The other columns the api's heartbeat bookkeeping writes too: newer wins.
        mark = text("UPDATE agents SET online = :online WHERE id = :id AND revoked_at IS NULL")
        report = text(
            "UPDATE agents SET serial = COALESCE(:serial, serial), "
            "location_id = COALESCE(:location_id, location_id), mode = COALESCE(:mode, mode), "
            "last_seen = :seen WHERE id = :id AND revoked_at IS NULL "
            "AND (last_seen IS NULL OR last_seen <= :seen)"
        ).bindparams(
            bindparam("serial"),
            bindparam("location_id"),
            bindparam("mode"),
            bindparam("seen", type_=DateTime(timezone=True)),
        )
        try:
            with engine.begin() as connection:
                connection.execute(mark, presence)
                if online:
                    connection.execute(report, online)
        except Exception:
            with self._lock:
                for agent_id, seen in pending.items():
                    self._pending.setdefault(agent_id, seen)
            raise
        return len(pending)
