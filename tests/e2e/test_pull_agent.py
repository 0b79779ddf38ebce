"""End to end: the real manager under uvicorn and real `policycast-agent` processes, over real HTTP."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric_core.signing import VerifyKey, open_envelope
from tests.support.processes import Manager, Process, python_env, wait_for

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
    root = root_group(manager)
    manager.call("PUT", f"/groups/{root}/communication", json={"mode": "pull", "heartbeat_s": HEARTBEAT_S})
    yield manager
    manager.stop()


def root_group(manager: Manager) -> int:
    return int(next(g["id"] for g in manager.call("GET", "/groups") if g["parent_id"] is None))


def agent_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent_stub", *args]


def enrolled_agent(manager: Manager, tmp_path: Path, name: str) -> tuple[Path, Process]:
    import subprocess

    root = root_group(manager)
    token = manager.call("POST", f"/groups/{root}/enrollment-tokens", expect=201, json={})["token"]
    state_dir = tmp_path / name
    enrol = subprocess.run(
        agent_cli("enroll", "--server", manager.url, "--token", token, "--state-dir", str(state_dir)),
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert enrol.returncode == 0, enrol.stderr
    process = Process(
        name, agent_cli("run", "--state-dir", str(state_dir)), env=python_env(), log_dir=tmp_path
    )
    return state_dir, process


def applied(state_dir: Path) -> dict[str, Any] | None:
    """The document the agent applied, verified against the key it pinned."""
    current = state_dir / "current.json"
    if not current.exists():
        return None
    identity = json.loads((state_dir / "identity.json").read_text())
    key = VerifyKey.from_base64(identity["signing_key"]["kid"], identity["signing_key"]["public_key"])
    return open_envelope(current.read_bytes(), key)


def current_serial(manager: Manager, group_id: int) -> int:
    location = manager.call("GET", f"/groups/{group_id}/locations")[0]["id"]
    return int(manager.call("GET", f"/groups/{group_id}/locations/{location}/effective")["doc"]["serial"])


def test_a_policy_change_reaches_a_pull_agent_within_one_heartbeat(manager: Manager, tmp_path: Path) -> None:
    state_dir, agent = enrolled_agent(manager, tmp_path, "agent-1")
    agent.start()
    try:
        root = root_group(manager)
        first = wait_for(lambda: applied(state_dir), timeout=10, what=f"a first document\n{agent.output()}")
        assert first["serial"] == current_serial(manager, root)
        agent_id = json.loads((state_dir / "identity.json").read_text())["agent_id"]

        policy = manager.call(
            "POST",
            "/policies",
            expect=201,
            json={"name": "fw", "type": "firewall", "body": {"default": "deny"}},
        )
        manager.call("PUT", f"/groups/{root}/policies/firewall", json={"policy_id": policy["id"]})
        target = current_serial(manager, root)
        assert target > first["serial"]

        # The agent heartbeats every HEARTBEAT_S (+/- jitter): the change must be applied by its next one.
        doc = wait_for(
            lambda: (d := applied(state_dir)) and d["serial"] == target and d,
            timeout=HEARTBEAT_S * (1 + JITTER) + SLACK_S,
            what=f"serial {target} on the agent\n{agent.output()}",
        )
        assert doc["policies"]["firewall"]["body"] == {"default": "deny"}
        # ... and the operator sees it report that serial back.
        view = wait_for(
            lambda: (a := manager.call("GET", f"/agents/{agent_id}"))["serial"] == target and a,
            timeout=HEARTBEAT_S * (1 + JITTER) + SLACK_S,
            what="the agent's reported serial",
        )
        assert view["up_to_date"] is True and view["online"] is True and view["mode"] == "pull"
    finally:
        assert agent.stop() == 0, agent.output()


def test_an_agent_keeps_its_last_good_document_while_the_manager_is_down(
    manager: Manager, tmp_path: Path
) -> None:
    state_dir, agent = enrolled_agent(manager, tmp_path, "agent-2")
    agent.start()
    try:
        root = root_group(manager)
        before = wait_for(lambda: applied(state_dir), timeout=10, what=f"a first document\n{agent.output()}")
        manager.stop()
        wait_for(
            lambda: "cannot reach" in agent.output() or "unreachable" in agent.output().lower(),
            timeout=HEARTBEAT_S * 3 + SLACK_S,
            what=f"the agent noticing the outage\n{agent.output()}",
        )
        assert agent.running
        assert applied(state_dir) == before  # still enforcing the last good document

        manager.start()
        policy = manager.call(
            "POST", "/policies", expect=201, json={"name": "av", "type": "antivirus", "body": {}}
        )
        manager.call("PUT", f"/groups/{root}/policies/antivirus", json={"policy_id": policy["id"]})
        target = current_serial(manager, root)
        # Back-off is capped by the heartbeat interval, so the agent is back within about two of them.
        wait_for(
            lambda: (d := applied(state_dir)) and d["serial"] == target,
            timeout=HEARTBEAT_S * 3 + SLACK_S,
            what=f"serial {target} after the outage\n{agent.output()}",
        )
    finally:
        assert agent.stop() == 0, agent.output()


def test_update_now_on_the_host_makes_the_agent_heartbeat_at_once(manager: Manager, tmp_path: Path) -> None:
    import subprocess

    root = root_group(manager)
    manager.call("PUT", f"/groups/{root}/communication", json={"heartbeat_s": 3600})
    state_dir, agent = enrolled_agent(manager, tmp_path, "agent-3")
    agent.start()
    try:
        wait_for(lambda: applied(state_dir), timeout=10, what=f"a first document\n{agent.output()}")
        policy = manager.call(
            "POST", "/policies", expect=201, json={"name": "lu", "type": "liveupdate", "body": {}}
        )
        manager.call("PUT", f"/groups/{root}/policies/liveupdate", json={"policy_id": policy["id"]})
        target = current_serial(manager, root)

        result = subprocess.run(
            agent_cli("update-now", "--state-dir", str(state_dir)),
            env=python_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        # The heartbeat is an hour away: only update-now can bring the change this soon.
        wait_for(
            lambda: (d := applied(state_dir)) and d["serial"] == target,
            timeout=SLACK_S + 2,
            what=f"serial {target} after update-now\n{agent.output()}",
        )
    finally:
        assert agent.stop() == 0, agent.output()
