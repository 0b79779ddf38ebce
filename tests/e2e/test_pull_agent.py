"""End to end: the real manager under uvicorn and real `policycast-agent` processes, over real HTTP."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import Manager, agent_cli, enrolled_agent, python_env
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e
HEARTBEAT_S = 2
JITTER = 0.1
SLACK_S = 3.0  # process scheduling on a shared two-core machine


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    manager = Manager(
        tmp_path / "manager",
        tmp_path,
        admin_key="pck_e2e-admin",
        heartbeat_flush_s="0.5",
        cache_refresh_s="0.5",
    ).start()
    manager.admin.communication(manager.root(), mode="pull", heartbeat_s=HEARTBEAT_S)
    yield manager
    manager.stop()


def test_a_policy_change_reaches_a_pull_agent_within_one_heartbeat(manager: Manager, tmp_path: Path) -> None:
    agent = enrolled_agent(manager, tmp_path, "agent-1").start()
    try:
        root = manager.root()
        first = wait_for(agent.applied, timeout=10, what=lambda: f"a first document\n{agent.output()}")
        assert first["serial"] == manager.admin.effective(root)["serial"]

        policy = manager.admin.policy("fw", "firewall", {"default": "deny"})
        manager.admin.assign(root, policy)
        target = manager.admin.effective(root)["serial"]
        assert target > first["serial"]

        # The agent heartbeats every HEARTBEAT_S (+/- jitter): the change must be applied by its next one.
        doc = wait_for(
            agent.applied,
            until=lambda d: d is not None and d["serial"] == target,
            timeout=HEARTBEAT_S * (1 + JITTER) + SLACK_S,
            what=lambda: f"serial {target} on the agent\n{agent.output()}",
        )
        assert doc is not None and doc["policies"]["firewall"]["body"] == {"default": "deny"}
        # ... and the operator sees it report that serial back.
        view = wait_for(
            lambda: manager.admin.agent(agent.agent_id),
            until=lambda a: a["serial"] == target,
            timeout=HEARTBEAT_S * (1 + JITTER) + SLACK_S,
            what="the agent's reported serial",
        )
        assert view["up_to_date"] is True and view["online"] is True and view["mode"] == "pull"
    finally:
        assert agent.stop() == 0, agent.output()


def test_an_agent_keeps_its_last_good_document_while_the_manager_is_down(
    manager: Manager, tmp_path: Path
) -> None:
    agent = enrolled_agent(manager, tmp_path, "agent-2").start()
    try:
        root = manager.root()
        before = wait_for(agent.applied, timeout=10, what=lambda: f"a first document\n{agent.output()}")
        manager.stop()
        wait_for(
            lambda: "cannot reach" in agent.output() or "unreachable" in agent.output().lower(),
            timeout=HEARTBEAT_S * 3 + SLACK_S,
            what=lambda: f"the agent noticing the outage\n{agent.output()}",
        )
        assert agent.running
        assert agent.applied() == before  # still enforcing the last good document

        manager.start()
        policy = manager.admin.policy("av", "antivirus", {})
        manager.admin.assign(root, policy)
        target = manager.admin.effective(root)["serial"]
        # Back-off is capped by the heartbeat interval, so the agent is back within about two of them.
        wait_for(
            agent.applied,
            until=lambda d: d is not None and d["serial"] == target,
            timeout=HEARTBEAT_S * 3 + SLACK_S,
            what=lambda: f"serial {target} after the outage\n{agent.output()}",
        )
    finally:
        assert agent.stop() == 0, agent.output()


def test_update_now_on_the_host_makes_the_agent_heartbeat_at_once(manager: Manager, tmp_path: Path) -> None:
    root = manager.root()
    manager.admin.communication(root, heartbeat_s=3600)
    agent = enrolled_agent(manager, tmp_path, "agent-3").start()
    try:
        wait_for(agent.applied, timeout=10, what=lambda: f"a first document\n{agent.output()}")
        policy = manager.admin.policy("lu", "liveupdate", {})
        manager.admin.assign(root, policy)
        target = manager.admin.effective(root)["serial"]

        result = subprocess.run(
            agent_cli("update-now", "--state-dir", str(agent.state_dir)),
            env=python_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        # The heartbeat is an hour away: only update-now can bring the change this soon.
        wait_for(
            agent.applied,
            until=lambda d: d is not None and d["serial"] == target,
            timeout=SLACK_S + 2,
            what=lambda: f"serial {target} after update-now\n{agent.output()}",
        )
    finally:
        assert agent.stop() == 0, agent.output()
