"""End to end: an agent moves between networks (a facts file) and switches location, in pull and in
push mode: the document changes, the manager sees the new location, and a push agent's subscription
follows (a change made only at the new location reaches it at once)."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from tests.e2e.test_pull_agent import applied, root_group
from tests.e2e.test_push_agent import PUSH_WITHIN_S, SLACK_S, PushStack, push_stack, wait_transport
from tests.support.processes import wait_for

pytestmark = pytest.mark.e2e
__all__ = ["push_stack"]  # the fixture, shared with test_push_agent
HOME = {"addresses": ["192.168.1.5"]}
OFFICE = {"addresses": ["10.1.2.3"]}


def move(facts_file: Path, facts: dict[str, list[str]]) -> None:
    facts_file.write_bytes(orjson.dumps(facts))


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_an_agent_that_joins_the_office_network_switches_to_the_office_location(
    push_stack: PushStack, tmp_path: Path, mode: str
) -> None:
    manager = push_stack.manager
    root = root_group(manager)
    heartbeat = 2 if mode == "pull" else 3600
    manager.call("PUT", f"/groups/{root}/communication", json={"mode": mode, "heartbeat_s": heartbeat})
    office = manager.call(
        "POST",
        f"/groups/{root}/locations",
        expect=201,
        json={"name": "Office", "conditions": [{"type": "ip_range", "cidr": "10.1.0.0/16", "weight": 10}]},
    )
    relaxed = manager.call(
        "POST", "/policies", expect=201, json={"name": "relaxed", "type": "firewall", "body": {"v": 1}}
    )
    manager.call(
        "PUT", f"/groups/{root}/locations/{office['id']}/policies/firewall", json={"policy_id": relaxed["id"]}
    )

    facts_file = tmp_path / "facts.json"
    move(facts_file, HOME)
    state_dir, agent, agent_id = push_stack.agent(
        f"roamer-{mode}", root, facts_file=str(facts_file), facts_check_s="0.2"
    )
    try:
        home = wait_for(lambda: applied(state_dir), timeout=10, what=f"a first document\n{agent.output()}")
        assert home["location_id"] != office["id"] and "firewall" not in home["policies"]
        if mode == "push":
            wait_transport(push_stack, agent_id, "push", agent, timeout=15)

        move(facts_file, OFFICE)

        doc = wait_for(
            lambda: (d := applied(state_dir)) and d["location_id"] == office["id"] and d,
            timeout=SLACK_S + 2,
            what=f"the switch to the Office location\n{agent.output()}",
        )
        assert doc["policies"]["firewall"]["body"] == {"v": 1}
        wait_for(
            lambda: push_stack.view(agent_id)["location_id"] == office["id"],
            timeout=SLACK_S + 2,
            what="the manager seeing the new location",
        )
        if mode == "push":
            # Only the Office document changes: it arrives by push, so the subscription moved with the agent.
            manager.call("PUT", f"/policies/{relaxed['id']}", json={"body": {"v": 2}})
            wait_for(
                lambda: (
                    (d := applied(state_dir)) is not None and d["policies"]["firewall"]["body"] == {"v": 2}
                ),
                timeout=PUSH_WITHIN_S + 1,
                what=f"the Office-only change pushed\n{agent.output()}",
            )

        move(facts_file, HOME)
        wait_for(
            lambda: (d := applied(state_dir)) and d["location_id"] == home["location_id"],
            timeout=SLACK_S + 2,
            what=f"the switch back home\n{agent.output()}",
        )
    finally:
        assert agent.stop() == 0, agent.output()
        assert json.loads((state_dir / "identity.json").read_text())["agent_id"] == agent_id
