"""End to end over TLS: what a plaintext client gets, the join token from the CLI, and a CA rotation
that agents follow without losing the manager (real `policycast serve`, `policycast admin` and
`policycast-agent` processes; a real Mosquitto configured as `policycast broker-config` does)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fabric_core.tls import ca_hash, split_join_token
from tests.support.broker import Broker
from tests.support.processes import AgentProcess, Manager, agent_cli, policycast, python_env
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e
HEARTBEAT_S = 1
WITHIN_S = 20.0  # heartbeats, cache refreshes and process scheduling on a shared two-core machine

MQTT_CONNECT = bytes.fromhex("100c00044d5154540402003c0000")
"""A plaintext MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s, empty client id)."""


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    manager = Manager(
        tmp_path / "manager",
        tmp_path,
        admin_key="pck_e2e-tls",
        tls=True,
        heartbeat_flush_s="0.3",
        cache_refresh_s="0.3",
    ).start()
    manager.admin.communication(manager.root(), mode="pull", heartbeat_s=HEARTBEAT_S)
    yield manager
    manager.stop()


def test_the_api_answers_no_plaintext_http(manager: Manager) -> None:
    assert manager.url.startswith("https://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(manager.url.replace("https://", "http://") + "/healthz", timeout=5)
    assert httpx.get(f"{manager.url}/healthz", verify=manager.ssl_context(), timeout=5).status_code == 200


def test_the_api_is_not_trusted_through_the_system_store(manager: Manager) -> None:
    """Its certificate comes from the manager's own CA: a client that does not pin it refuses it."""
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{manager.url}/healthz", timeout=5)


def test_the_broker_answers_no_plaintext_mqtt(mosquitto: Broker) -> None:
    assert mosquitto.url.startswith("mqtts://")
    with socket.create_connection(("127.0.0.1", mosquitto.port), timeout=5) as plain:
        plain.sendall(MQTT_CONNECT)
        answer = _read_until_closed(plain)
    assert not answer.startswith(b"\x20"), "a plaintext CONNECT got a CONNACK"


def _read_until_closed(sock: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return got


def test_a_ca_rotation_reaches_agents_before_the_old_ca_goes(manager: Manager, tmp_path: Path) -> None:
    env = manager.process.env
    old_hash = manager.ca.hash if manager.ca else ""
    joined = _cli(policycast("admin", "enroll-token", "--server", manager.url, env=env))
    assert split_join_token(joined.strip())[1] == old_hash  # the token carries the CA to pin

    state_dir = tmp_path / "agent"
    _cli(_agent("enroll", "--server", manager.url, "--token", joined.strip(), "--state-dir", str(state_dir)))
    agent = AgentProcess("agent", state_dir, env=python_env(), log_dir=tmp_path).start()
    try:
        _trusted_by(agent, [old_hash])

        # 1. A new CA, trusted at once: documents name both, and the agent learns it.
        _cli(policycast("admin", "tls", "prepare-ca", env=env))
        new_hash = ca_hash((manager.data_dir / "tls" / "next" / "ca.pem").read_bytes())
        _trusted_by(agent, [old_hash, new_hash])

        # 2. It issues: the api restarts with a certificate from it, and the agent still gets through.
        _cli(policycast("admin", "tls", "promote-ca", env=env))
        manager.stop()
        manager.reload_ca()
        manager.start()
        assert manager.ca is not None and manager.ca.hash == new_hash
        _converges(manager, agent, "after the promotion")

        # 3. The old CA retired: documents name the new one only, and the agent goes on with it alone.
        _cli(policycast("admin", "tls", "retire-ca", old_hash, env=env))
        _trusted_by(agent, [new_hash])
        _converges(manager, agent, "after the old CA was retired")
    finally:
        assert agent.stop() == 0, agent.output()


def _trusted_by(agent: AgentProcess, hashes: list[str]) -> None:
    """Until the agent's applied document names exactly these CAs, oldest first."""

    def named() -> list[str]:
        doc = agent.applied() or {}
        return [ca_hash(pem.encode()) for pem in doc.get("trust", {}).get("ca_certificates", [])]

    wait_for(
        named,
        until=lambda found: found == hashes,
        timeout=WITHIN_S,
        what=lambda: f"the agent trusting {hashes}\n{agent.output()}",
    )


def _converges(manager: Manager, agent: AgentProcess, when: str) -> None:
    """A policy change reaches the agent over HTTPS (its heartbeats get through)."""
    root = manager.root()
    manager.admin.assign(root, manager.admin.policy(f"fw-{when}", "firewall", {"when": when}))
    target = manager.admin.effective(root)["serial"]
    wait_for(
        agent.applied,
        until=lambda doc: doc is not None and doc["serial"] == target,
        timeout=WITHIN_S,
        what=lambda: f"serial {target} on the agent {when}\n{agent.output()}",
    )


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent_cli(*args), env=python_env(), capture_output=True, text=True, timeout=60, check=False
    )


def _cli(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout
