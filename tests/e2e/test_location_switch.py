"""End to end: an agent moves between networks (a facts file) and switches location, in pull and in
push mode: the document changes, the manager sees the new location, and a push agent's subscription
follows (a change made only at the new location reaches it at once)."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from tests.e2e.conftest import PushStack
from tests.e2e.test_push_agent import PUSH_WITHIN_S, SLACK_S
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e
HOME = {"addresses": ["192.168.1.5"]}
OFFICE = {"addresses": ["10.1.2.3"]}


def move(facts_file: Path, facts: dict[str, list[str]]) -> None:
    facts_file.write_bytes(orjson.dumps(facts))


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_an_agent_that_joins_the_office_network_switches_to_the_office_location(
    push_stack: PushStack, tmp_path: Path, mode: str
) -> None:
    admin = push_stack.manager.admin
    root = push_stack.manager.root()
    heartbeat = 2 if mode == "pull" else 3600
    admin.communication(root, mode=mode, heartbeat_s=heartbeat)
    office = admin.post(
        f"/groups/{root}/locations",
        {"name": "Office", "conditions": [{"type": "ip_range", "cidr": "10.1.0.0/16", "weight": 10}]},
    )
    relaxed = admin.policy("relaxed", "firewall", {"v": 1})
    admin.assign(root, relaxed, location_id=office["id"])

    facts_file = tmp_path / "facts.json"
    move(facts_file, HOME)
    agent = push_stack.agent(f"roamer-{mode}", root, facts_file=str(facts_file), facts_check_s="0.2")
    try:
        home = wait_for(agent.applied, timeout=10, what=lambda: f"a first document\n{agent.output()}")
        assert home["location_id"] != office["id"] and "firewall" not in home["policies"]
        if mode == "push":
            push_stack.wait_transport(agent, "push", timeout=15)

        move(facts_file, OFFICE)

        doc = wait_for(
            agent.applied,
            until=lambda d: d is not None and d["location_id"] == office["id"],
            timeout=SLACK_S + 2,
            what=lambda: f"the switch to the Office location\n{agent.output()}",
        )
        assert doc is not None and doc["policies"]["firewall"]["body"] == {"v": 1}
        wait_for(
            lambda: push_stack.view(agent.agent_id)["location_id"] == office["id"],
            timeout=SLACK_S + 2,
            what="the manager seeing the new location",
        )
        if mode == "push":
            # Only the Office document changes: it arrives by push, so the subscription moved with the agent.
            admin.put(f"/policies/{relaxed['id']}", {"body": {"v": 2}})
            wait_for(
                agent.applied,
                until=lambda d: d is not None and d["policies"]["firewall"]["body"] == {"v": 2},
                timeout=PUSH_WITHIN_S + 1,
                what=lambda: f"the Office-only change pushed\n{agent.output()}",
            )

        move(facts_file, HOME)
        wait_for(
            agent.applied,
            until=lambda d: d is not None and d["location_id"] == home["location_id"],
            timeout=SLACK_S + 2,
            what=lambda: f"the switch back home\n{agent.output()}",
        )
    finally:
        assert agent.stop() == 0, agent.output()
        assert json.loads((agent.state_dir / "identity.json").read_text())["agent_id"] == agent.agent_id
