"""LocationTracker: when the agent re-evaluates its location and what a switch sets in motion."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent_stub.core import AgentCore
from agent_stub.facts import HostFacts
from agent_stub.locator import LocationTracker, host_facts_reader
from agent_stub.state import FileStateStore
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from tests.agent_stub.conftest import LOCATION_ID, WAIT_S, make_doc
from tests.support.waiting import wait_for_async

OFFICE = LOCATION_ID + 1


@pytest.fixture
def core(file_store: FileStateStore) -> AgentCore:
    return AgentCore.from_store(file_store)


def office_doc(serial: int = 5) -> dict[str, Any]:
    doc = make_doc(serial=serial)
    doc["locations"] = [
        {"id": LOCATION_ID, "name": "Default", "is_default": True, "conditions": []},
        {
            "id": OFFICE,
            "name": "Office",
            "is_default": False,
            "conditions": [{"type": "ip_range", "cidr": "10.1.0.0/16", "weight": 10}],
        },
    ]
    return doc


class Facts:
    def __init__(self, *addresses: str) -> None:
        self.value = HostFacts(addresses=addresses)

    def __call__(self) -> HostFacts:
        return self.value


def tracker(core: AgentCore, facts: Facts, switches: list[int], reachable: bool = True) -> LocationTracker:
    settings = AgentSettings(location_check_s=3600, facts_check_s=0.01)
    return LocationTracker(
        core,
        settings,
        manager_reachable=lambda: reachable,
        on_switch=lambda: switches.append(1),
        read_facts=facts,
    )


def test_a_matching_network_makes_the_agent_want_that_location(
    core: AgentCore, signing_key: SigningKey
) -> None:
    assert core.offer(signing_key.sign_envelope(office_doc()), "heartbeat").applied
    switches: list[int] = []
    facts = Facts("10.1.2.3")
    locations = tracker(core, facts, switches)

    asyncio.run(locations.refresh_facts())
    choice = locations.evaluate()

    assert choice is not None and (choice.location_id, choice.name, choice.score) == (OFFICE, "Office", 10)
    assert locations.wanted == OFFICE
    assert switches == [1]  # the pull loop is asked to heartbeat at once
    locations.evaluate()
    assert switches == [1]  # the same choice again asks nothing more


def test_no_match_keeps_the_default_and_asks_nothing(core: AgentCore, signing_key: SigningKey) -> None:
    assert core.offer(signing_key.sign_envelope(office_doc()), "heartbeat").applied
    switches: list[int] = []
    locations = tracker(core, Facts("192.168.1.5"), switches)
    asyncio.run(locations.refresh_facts())
    assert locations.evaluate() is not None
    assert locations.wanted == LOCATION_ID and switches == []


def test_changed_facts_are_noticed_without_waiting_for_the_timer(
    core: AgentCore, signing_key: SigningKey
) -> None:
    assert core.offer(signing_key.sign_envelope(office_doc()), "heartbeat").applied
    switches: list[int] = []
    facts = Facts("192.168.1.5")
    locations = tracker(core, facts, switches)  # the timer is an hour; facts are looked at every 10 ms

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(locations.run(stop))
        # The first evaluation, at once: nothing matches, the current location stays.
        await wait_for_async(lambda: locations.wanted == LOCATION_ID, timeout=WAIT_S, what="a first choice")
        facts.value = HostFacts(addresses=("10.1.9.9",))  # the laptop joins the office network
        # Within a second, where the timer would take an hour.
        await wait_for_async(lambda: locations.wanted == OFFICE, timeout=1.0, what="the office chosen")
        stop.set()
        await task

    asyncio.run(scenario())
    assert locations.wanted == OFFICE and switches == [1]


def test_before_any_document_there_is_nothing_to_choose(core: AgentCore) -> None:
    locations = tracker(core, Facts("10.1.2.3"), [])
    asyncio.run(locations.refresh_facts())
    assert locations.evaluate() is None and locations.wanted is None


def test_a_facts_file_overrides_the_host_and_a_broken_one_is_ignored(tmp_path: Path) -> None:
    facts_file = tmp_path / "facts.json"
    facts_file.write_bytes(orjson.dumps({"addresses": ["10.1.2.3"], "network_types": ["vpn"]}))
    read = host_facts_reader(facts_file)
    facts = read()
    assert facts.addresses == ("10.1.2.3",) and facts.network_types == frozenset({"vpn"})

    facts_file.write_text("{not json")
    assert read().addresses != ("10.1.2.3",)  # the host's own facts, and a warning
