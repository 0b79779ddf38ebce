"""The push stack of the e2e tests, on each engine (a real Mosquitto, a real 3-node NATS cluster:
`push_broker`), `policycast serve` and `policycast bridge`, each a real process; agents are started
by the tests."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from tests.support.engines import ENGINES, PushBroker, start_push_broker
from tests.support.processes import AgentProcess, Manager, Process, enrolled_agent, free_port
from tests.support.waiting import wait_for


def _env(value: Any) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


@dataclass
class PushStack:
    manager: Manager
    broker: PushBroker
    bridge: Process
    tmp: Path
    bridge_metrics_url: str = ""
    """Where the bridge process serves its Prometheus metrics."""

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


@pytest.fixture(params=ENGINES)
def push_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PushBroker]:
    """The broker on each engine, with certificates from the manager's CA (made here, in the
    manager's data directory, before its first start finds it; NATS's keys too): agents and the
    bridge trust only that CA."""
    broker = start_push_broker(request.param, tmp_path / "broker", tmp_path / "manager")
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def push_stack(tmp_path: Path, push_broker: PushBroker) -> Iterator[PushStack]:
    broker_settings = {
        **{name: _env(value) for name, value in push_broker.manager_settings().items() if value is not None},
        "heartbeat_flush_s": "0.3",
        "cache_refresh_s": "0.3",
        "bridge_poll_s": "0.05",
        # On NATS a command travels at QoS 0: one sent just as an agent subscribed on another node
        # can be lost, and the bridge sends it again (soon, here).
        "command_resend_s": "1",
        "anti_entropy_s": "0.5",
    }
    manager = Manager(tmp_path / "manager", tmp_path, admin_key="pck_e2e-push", **broker_settings).start()
    metrics_port = free_port()
    env = {**manager.process.env, "POLICYCAST_BRIDGE_METRICS_PORT": str(metrics_port)}
    bridge_argv = [sys.executable, "-m", "local_stack", "bridge"]
    bridge = Process("bridge", bridge_argv, env=env, log_dir=tmp_path).start()
    stack = PushStack(manager, push_broker, bridge, tmp_path, f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        yield stack
    finally:
        bridge.stop()
        manager.stop()
