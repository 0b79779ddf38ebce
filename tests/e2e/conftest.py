"""The push stack of the e2e tests: Mosquitto with the project's configuration (the `mosquitto` fixture),
`policycast serve` and `policycast bridge`, each a real process; agents are started by the tests."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fabric_core.tls import ManagerCA
from tests.support.broker import Broker, require_mosquitto
from tests.support.processes import AgentProcess, Manager, Process, enrolled_agent
from tests.support.waiting import wait_for


@dataclass
class PushStack:
    manager: Manager
    broker: Broker
    bridge: Process
    tmp: Path

    def agent(self, name: str, group_id: int, **settings: str) -> AgentProcess:
        """Enrol and start an agent; `settings` become POLICYCAST_AGENT_* variables of its process."""
        agent_settings = {"reconnect_min_s": "0.2", "reconnect_max_s": "1", **settings}
        return enrolled_agent(self.manager, self.tmp, name, group_id=group_id, **agent_settings).start()

    def view(self, agent_id: str) -> dict[str, Any]:
        return self.manager.admin.agent(agent_id)

    def wait_transport(self, agent: AgentProcess, mode: str, timeout: float = 15) -> dict[str, Any]:
        """The operator's view of the agent once it reports `mode` (push or pull) as its transport."""
        return wait_for(
            lambda: self.view(agent.agent_id),
            until=lambda v: v["mode"] == mode,
            timeout=timeout,
            what=lambda: f"agent {agent.agent_id} reporting {mode}\n{agent.output()}",
        )

    def change(self, group_id: int, body: dict[str, Any]) -> int:
        """Assign a fresh policy to the group; return the group's new serial."""
        policy = self.manager.admin.policy(f"fw-{time.monotonic_ns()}", "firewall", body)
        self.manager.admin.assign(group_id, policy)
        return int(self.manager.admin.effective(group_id)["serial"])


@pytest.fixture
def push_broker(tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto with a certificate from the manager's CA (made here, before the manager's first
    start finds it), as `policycast broker-config` issues one: agents and the bridge trust only it."""
    require_mosquitto()
    broker = Broker(tmp_path / "mosquitto", ca=ManagerCA.load_or_create(tmp_path / "manager" / "tls"))
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def push_stack(tmp_path: Path, push_broker: Broker) -> Iterator[PushStack]:
    mosquitto = push_broker
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
