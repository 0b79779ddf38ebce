"""End to end, the convergence SLO: `policycast serve`, `policycast bridge` and push and pull
`policycast-agent run` processes on each engine (the `push_stack` fixture). One change reaching every
agent is observed exactly once per agent, by the api (pull agents' heartbeats) or the bridge (push
agents' state messages), whichever recorded the agent's new serial first; and the console's summary
(`recent_changes`) finds every agent of the change on its serial."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlmodel import Session

from api.services.convergence import recent_changes
from manager_db.database import make_engine
from tests.e2e.conftest import PushStack
from tests.support.metrics import Samples, scrape
from tests.support.processes import AgentProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e
COUNT = "policycast_convergence_seconds_count"
PULL_HEARTBEAT_S = 2


def converged(stack: PushStack) -> tuple[Samples, Samples]:
    """The api's and the bridge's metrics, scraped now."""
    api = scrape(stack.manager.admin.client)
    with httpx.Client(timeout=5) as client:
        bridge = scrape(client, stack.bridge_metrics_url)
    return api, bridge


def observed(stack: PushStack) -> float:
    api, bridge = converged(stack)
    return api.value(COUNT) + bridge.value(COUNT)


def on_current_serial(stack: PushStack, agents: list[AgentProcess]) -> list[dict[str, Any]]:
    views = [stack.view(agent.agent_id) for agent in agents]
    return views if all(v["serial"] == v["current_serial"] for v in views) else []


def heartbeat_again(stack: PushStack, agent: AgentProcess) -> None:
    """Wait until the manager recorded a heartbeat of `agent` later than the one it holds now."""
    seen = stack.view(agent.agent_id)["last_seen"]
    wait_for(
        lambda: stack.view(agent.agent_id)["last_seen"] != seen,
        timeout=PULL_HEARTBEAT_S * 3 + 5,
        what=f"a later heartbeat of {agent.agent_id} recorded",
    )


def test_a_change_is_observed_converging_once_per_agent_across_the_api_and_the_bridge(
    push_stack: PushStack,
) -> None:
    admin = push_stack.manager.admin
    root = push_stack.manager.root()
    push_group = admin.group("Push", root, inherit=False)["id"]
    pull_group = admin.group("Pull", root, inherit=False)["id"]
    admin.communication(push_group, mode="push", heartbeat_s=3600)
    admin.communication(pull_group, mode="pull", heartbeat_s=PULL_HEARTBEAT_S)
    shared = admin.policy("fw", "firewall", {"default": "deny"})  # one policy, both groups' documents
    for group in (push_group, pull_group):
        admin.assign(group, shared)
    push_agents = [push_stack.agent(f"push-{i}", push_group) for i in range(2)]
    pull_agents = [push_stack.agent(f"pull-{i}", pull_group) for i in range(2)]
    agents = push_agents + pull_agents
    try:
        for agent in push_agents:
            push_stack.wait_transport(agent, "push", timeout=20)
        wait_for(
            lambda: on_current_serial(push_stack, agents),
            timeout=20,
            what=lambda: "every agent on its first document\n" + "\n".join(a.output() for a in agents),
        )
        before = observed(push_stack)

        admin.put(f"/policies/{shared['id']}", {"body": {"default": "allow"}})  # one change, two documents
        targets = {group: admin.effective(group)["serial"] for group in (push_group, pull_group)}
        views = wait_for(
            lambda: on_current_serial(push_stack, agents),
            timeout=30,
            what=lambda: f"every agent on {targets}\n" + "\n".join(a.output() for a in agents),
        )
        assert {v["serial"] for v in views} == set(targets.values())
        wait_for(
            lambda: observed(push_stack),
            until=lambda count: count >= before + len(agents),
            timeout=15,
            what="the convergence of every agent observed",
        )
        # And no more: the pull agents heartbeat again, the push agents' state stays retained, yet
        # nothing is counted twice. Awaited: a later heartbeat of each pull agent recorded.
        for agent in pull_agents:
            heartbeat_again(push_stack, agent)
        api, bridge = converged(push_stack)
        assert api.value(COUNT) + bridge.value(COUNT) == before + len(agents)
        assert bridge.value(COUNT) >= 1, "push agents report their serial over MQTT, to the bridge"
        assert api.value(COUNT) >= 1, "pull agents report theirs by heartbeat, to the api"
        for samples in (api, bridge):  # seconds, on one machine: every one under a minute
            assert samples.value("policycast_convergence_seconds_bucket", le="60.0") == samples.value(COUNT)

        database = make_engine(f"sqlite:///{push_stack.manager.data_dir / 'policycast.db'}")
        try:
            with Session(database) as session:
                latest = recent_changes(session, limit=1)[0]
        finally:
            database.dispose()
        assert (latest.first_serial, latest.last_serial) == (min(targets.values()), max(targets.values()))
        assert latest.agents_total == latest.agents_on_serial == len(agents)
        assert latest.p50_s is not None and latest.p99_s is not None
        assert 0 <= latest.p50_s <= latest.p99_s < 60
        assert latest.action == "policy.update"
    finally:
        for agent in agents:
            assert agent.stop() == 0, agent.output()
