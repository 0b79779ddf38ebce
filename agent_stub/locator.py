"""Where the agent is: SEPM's location awareness, driven by host facts and the held document.

The agent re-evaluates its location every `location_check_s`, whenever its host facts change (looked at
every `facts_check_s`), and whenever a document brings a new list of locations. When the best-scoring
location differs from the one it holds, it wants that location: the pull loop asks the manager for its
document at once, and once applied the push subscription follows the held document. The held document
is on disk, so the last location is remembered across restarts (and ties keep it, so agents do not flap).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from agent_stub.core import AgentCore
from agent_stub.errors import FactsFileError
from agent_stub.facts import HostFacts, facts_signature, load_facts_file, merge_facts, read_host_facts
from agent_stub.location import LocationChoice, choose_location
from fabric_core.settings import AgentSettings

log = logging.getLogger(__name__)

FactsReader = Callable[[], HostFacts]


def host_facts_reader(facts_file: Path | None) -> FactsReader:
    """Host facts, overridden by `facts_file` when given (re-read each time, so tests can move agents)."""

    def read() -> HostFacts:
        facts = read_host_facts()
        if facts_file is None:
            return facts
        try:
            return merge_facts(facts, load_facts_file(facts_file))
        except FactsFileError as exc:
            log.warning("ignoring the facts file: %s", exc)
            return facts

    return read


class LocationTracker:
    def __init__(
        self,
        core: AgentCore,
        settings: AgentSettings,
        *,
        manager_reachable: Callable[[], bool],
        on_switch: Callable[[], None],
        read_facts: FactsReader | None = None,
    ) -> None:
        self._core = core
        self._check_s = settings.location_check_s
        self._facts_check_s = min(settings.facts_check_s, settings.location_check_s)
        self._manager_reachable = manager_reachable
        self._on_switch = on_switch
        self._read_facts = read_facts or host_facts_reader(settings.facts_file)
        self._facts: HostFacts | None = None
        self._signature: str | None = None
        self.choice: LocationChoice | None = None

    @property
    def wanted(self) -> int | None:
        """The location to ask the manager for; None until a document has been evaluated."""
        return None if self.choice is None else self.choice.location_id

    def evaluate(self) -> LocationChoice | None:
        """Choose a location from the held document's list and the last facts read."""
        document, facts = self._core.document, self._facts
        if document is None or facts is None or not document.locations:
            return None
        choice = choose_location(
            document.locations,
            facts,
            manager_reachable=self._manager_reachable(),
            current=self._core.location_id,
        )
        previous, self.choice = self.choice, choice
        if choice.location_id != self._core.location_id and (previous is None or previous != choice):
            log.info(
                "location: %s (score %d: %s) instead of %s",
                choice.name,
                choice.score,
                ", ".join(choice.reasons) or "nothing matched",
                self._core.location_id,
            )
            self._on_switch()
        return choice

    async def refresh_facts(self) -> bool:
        """Read the facts again (off the event loop); True if they changed."""
        facts = await asyncio.to_thread(self._read_facts)
        signature = facts_signature(facts)
        changed = signature != self._signature
        self._facts, self._signature = facts, signature
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        """Re-evaluate on a timer and whenever the facts change, until `stop` is set."""
        since_evaluation = self._check_s  # evaluate at once
        while not stop.is_set():
            changed = await self.refresh_facts()
            if changed or since_evaluation >= self._check_s:
                self.evaluate()
                since_evaluation = 0.0
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._facts_check_s)
            except TimeoutError:
                since_evaluation += self._facts_check_s
