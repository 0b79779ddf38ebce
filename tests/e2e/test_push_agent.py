"""End to end in push mode: Mosquitto with the project's configuration, `policycast serve`,
`policycast bridge` and `policycast-agent run`, each a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from fabric_core.signing import SigningKey
from fabric_core.topics import config_topic
from tests.e2e.test_pull_agent import agent_cli, applied, root_group
from tests.support.broker import Broker
from tests.support.processes import Manager, Process, python_env, wait_for

pytestmark = pytest.mark.e2e
PUSH_WITHIN_S = 2.0  # the bound for a change to reach push agents
SLACK_S = 3.0


@dataclass
class PushStack:
    manager: Manager
    broker: Broker
    bridge: Process
    tmp: Path

    def agent(self, name: str, group_id: int, **settings: str) -> tuple[Path, Process, str]:
        """Enrol and start an agent; `settings` become POLICYCAST_AGENT_* variables of its process."""
        token = self.manager.call("POST", f"/groups/{group_id}/enrollment-tokens", expect=201, json={})[
            "token"
        ]
        state_dir = self.tmp / name
        enrol = subprocess.run(
            agent_cli(
                "enroll", "--server", self.manager.url, "--token", token, "--state-dir", str(state_dir)
            ),
            env=python_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert enrol.returncode == 0, enrol.stderr
        agent_id = json.loads((state_dir / "identity.json").read_text())["agent_id"]
        agent_settings = {"reconnect_min_s": "0.2", "reconnect_max_s": "1", **settings}
        env = python_env(**{f"POLICYCAST_AGENT_{k.upper()}": v for k, v in agent_settings.items()})
        process = Process(name, agent_cli("run", "--state-dir", str(state_dir)), env=env, log_dir=self.tmp)
        return state_dir, process.start(), agent_id

    def view(self, agent_id: str) -> dict[str, Any]:
        return dict(self.manager.call("GET", f"/agents/{agent_id}"))

    def change(self, group_id: int, body: dict[str, Any]) -> int:
        """Assign a fresh policy to the group; return the group's new serial."""
        name = f"fw-{time.monotonic_ns()}"
        policy = self.manager.call(
            "POST", "/policies", expect=201, json={"name": name, "type": "firewall", "body": body}
        )
        self.manager.call("PUT", f"/groups/{group_id}/policies/firewall", json={"policy_id": policy["id"]})
        location = self.manager.call("GET", f"/groups/{group_id}/locations")[0]["id"]
        return int(
            self.manager.call("GET", f"/groups/{group_id}/locations/{location}/effective")["doc"]["serial"]
        )


@pytest.fixture
def push_stack(tmp_path: Path, mosquitto: Broker) -> Iterator[PushStack]:
    broker_settings = {
        "mqtt_url": mosquitto.url,
        "mqtt_password": mosquitto.bridge_password,
        "heartbeat_flush_s": "0.3",
        "cache_refresh_s": "0.3",
        "bridge_poll_s": "0.05",
    }
    manager = Manager(tmp_path / "manager", tmp_path, admin_key="pck_e2e-push", **broker_settings).start()
    env = dict(manager.process.env)
    bridge_argv = [sys.executable, "-m", "local_stack", "bridge"]
    bridge = Process("bridge", bridge_argv, env=env, log_dir=tmp_path).start()
    stack = PushStack(manager, mosquitto, bridge, tmp_path)
    try:
        yield stack
    finally:
        bridge.stop()
        manager.stop()


def wait_transport(
    stack: PushStack, agent_id: str, mode: str, agent: Process, timeout: float
) -> dict[str, Any]:
    return wait_for(
        lambda: (v := stack.view(agent_id))["mode"] == mode and v,
        timeout=timeout,
        what=f"agent {agent_id} reporting {mode}\n{agent.output()}",
    )


def test_a_change_reaches_a_push_agent_at_once_while_its_heartbeat_is_an_hour_away(
    push_stack: PushStack,
) -> None:
    root = root_group(push_stack.manager)
    push_stack.manager.call(
        "PUT", f"/groups/{root}/communication", json={"mode": "push", "heartbeat_s": 3600}
    )
    state_dir, agent, agent_id = push_stack.agent("push-1", root)
    try:
        wait_transport(push_stack, agent_id, "push", agent, timeout=15)
        target = push_stack.change(root, {"default": "deny"})
        started = time.monotonic()
        wait_for(
            lambda: (d := applied(state_dir)) and d["serial"] == target,
            timeout=PUSH_WITHIN_S,
            what=f"serial {target} pushed to the agent\n{agent.output()}",
        )
        assert time.monotonic() - started <= PUSH_WITHIN_S
        view = wait_for(
            lambda: (v := push_stack.view(agent_id))["up_to_date"] and v, timeout=5, what="the report"
        )
        assert view["online"] is True and view["mode"] == "push"
    finally:
        assert agent.stop() == 0, agent.output()


def test_the_broker_going_away_falls_back_to_pull_and_coming_back_returns_to_push(
    push_stack: PushStack,
) -> None:
    root = root_group(push_stack.manager)
    push_stack.manager.call("PUT", f"/groups/{root}/communication", json={"mode": "push", "heartbeat_s": 2})
    state_dir, agent, agent_id = push_stack.agent("push-2", root)
    try:
        wait_transport(push_stack, agent_id, "push", agent, timeout=15)
        push_stack.broker.stop()

        during = push_stack.change(root, {"during": "outage"})
        wait_for(
            lambda: (d := applied(state_dir)) and d["serial"] == during,
            timeout=2 * 1.1 + SLACK_S,
            what=f"serial {during} by heartbeat during the outage\n{agent.output()}",
        )
        wait_transport(push_stack, agent_id, "pull", agent, timeout=5)

        push_stack.broker.start()
        wait_transport(push_stack, agent_id, "push", agent, timeout=15)
        after = push_stack.change(root, {"after": "outage"})
        wait_for(
            lambda: (d := applied(state_dir)) and d["serial"] == after,
            timeout=PUSH_WITHIN_S + 1,
            what=f"serial {after} after the broker returned\n{agent.output()}",
        )
    finally:
        assert agent.stop() == 0, agent.output()


def test_operator_update_now_makes_a_push_agent_heartbeat_at_once(push_stack: PushStack) -> None:
    root = root_group(push_stack.manager)
    push_stack.manager.call(
        "PUT", f"/groups/{root}/communication", json={"mode": "push", "heartbeat_s": 3600}
    )
    _, agent, agent_id = push_stack.agent("push-3", root)
    try:
        wait_transport(push_stack, agent_id, "push", agent, timeout=15)
        time.sleep(1.0)  # let the first heartbeat's bookkeeping settle
        before = push_stack.view(agent_id)["last_seen"]

        push_stack.manager.call("POST", f"/agents/{agent_id}/update-now", expect=202, json={})

        # Its next heartbeat is an hour away: a fresh last_seen can only come from update-now.
        wait_for(
            lambda: push_stack.view(agent_id)["last_seen"] != before,
            timeout=SLACK_S + 2,
            what=f"a heartbeat after update-now\n{agent.output()}",
        )
    finally:
        assert agent.stop() == 0, agent.output()


def test_a_forged_or_unsigned_document_on_the_config_topic_is_not_applied(push_stack: PushStack) -> None:
    root = root_group(push_stack.manager)
    push_stack.manager.call(
        "PUT", f"/groups/{root}/communication", json={"mode": "push", "heartbeat_s": 3600}
    )
    state_dir, agent, agent_id = push_stack.agent("push-4", root)
    try:
        wait_transport(push_stack, agent_id, "push", agent, timeout=15)
        held = applied(state_dir)
        assert held is not None
        location = held["location_id"]
        topic = config_topic("policycast", root, location)
        forged_doc = {
            **held,
            "serial": held["serial"] + 1000,
            "policies": {"firewall": {"body": {"open": "all"}}},
        }
        forged = SigningKey.generate().sign_envelope(forged_doc)  # a key the agent never pinned
        unsigned = orjson.dumps({"doc": forged_doc, "sig": "", "kid": "none"})
        tampered = orjson.loads(forged)
        tampered["kid"] = json.loads((state_dir / "identity.json").read_text())["signing_key"]["kid"]
        admin = push_stack.broker.link("forger")  # the bridge's own credentials: the broker lets it publish
        for payload in (forged, unsigned, orjson.dumps(tampered), b"not json"):
            admin.publish(topic, payload, qos=1, retain=False)
        wait_for(
            lambda: agent.output().count("rejected a document from mqtt") >= 4,
            timeout=5,
            what=f"the agent rejecting four payloads\n{agent.output()}",
        )
        assert applied(state_dir) == held
    finally:
        assert agent.stop() == 0, agent.output()
