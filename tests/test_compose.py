"""compose.yaml is valid and agrees with the code: settings it sets exist, commands it runs exist,
services wait for healthy dependencies, and the broker it configures is the one the bridge reaches."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from broker_bridge.mosquitto.install import DYNSEC_PLUGIN_PATHS
from fabric_core.settings import AgentSettings, MqttAddress, Settings
from local_stack.cli import app as manager_cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DEFAULT = re.compile(r"\$\{(?P<name>[A-Z_]+)(?::-(?P<default>[^}]*))?\}")


def resolved(value: str) -> str:
    """`${VAR:-default}` as compose resolves it with VAR unset."""
    return DEFAULT.sub(lambda m: m.group("default") or "", value)


def environment(service: str) -> dict[str, str]:
    return {k: resolved(str(v)) for k, v in (SERVICES[service].get("environment") or {}).items()}


def command_line(service: str) -> str:
    command = SERVICES[service].get("command", [])
    return command if isinstance(command, str) else " ".join(command)


def test_every_service_is_complete_and_waits_for_healthy_dependencies() -> None:
    assert set(SERVICES) >= {"postgres", "mosquitto", "api", "bridge", "push-agent", "pull-agent"}
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            assert condition in {"service_healthy", "service_completed_successfully", "service_started"}
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{name} waits for {dependency}'s health"
    for named in ("postgres", "mosquitto", "api"):
        assert SERVICES[named]["healthcheck"]["test"], named
    volumes = set(COMPOSE["volumes"])
    for service in SERVICES.values():
        for mount in service.get("volumes", []):
            assert mount.split(":")[0] in volumes


@pytest.mark.parametrize("service", ["api", "bridge", "broker-config", "push-agent", "pull-agent"])
def test_settings_in_compose_exist_and_validate(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment(service)
    manager_fields = {f"POLICYCAST_{name.upper()}" for name in Settings.model_fields}
    agent_fields = {f"POLICYCAST_AGENT_{name.upper()}" for name in AgentSettings.model_fields}
    for key in env:
        if key.startswith("POLICYCAST_"):
            assert key in manager_fields | agent_fields, f"{service} sets {key}, which no setting reads"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    AgentSettings()
    if service in ("api", "bridge"):
        assert settings.database_url and settings.database_url.startswith("postgresql://")
        assert settings.bootstrap_admin_key is not None and settings.mqtt_password is not None


def test_the_broker_the_bridge_reaches_is_the_one_compose_configures() -> None:
    bridge = MqttAddress.parse(environment("bridge")["POLICYCAST_MQTT_URL"])
    config = shlex.split(SERVICES["broker-config"]["command"][-1])
    port = int(config[config.index("--port") + 1])
    plugin = config[config.index("--plugin") + 1]
    assert bridge.host == "mosquitto" and bridge.port == port
    assert plugin in DYNSEC_PLUGIN_PATHS  # where the official image keeps the dynamic-security plugin
    assert f"{port}:{port}" in SERVICES["mosquitto"]["ports"]
    assert "/broker/mosquitto.conf" in command_line("mosquitto")
    assert "--out /broker" in command_line("broker-config")


def test_the_commands_compose_runs_exist() -> None:
    manager = get_command(manager_cli)
    admin = manager.commands["admin"]  # type: ignore[attr-defined]
    assert {"serve", "bridge", "broker-config"} <= set(manager.commands)  # type: ignore[attr-defined]
    assert "enroll-token" in admin.commands
    for service in ("push-agent", "pull-agent"):
        line = command_line(service)
        assert "policycast-agent enroll" in line and "exec policycast-agent run" in line
        assert "policycast admin enroll-token" in line
    assert "--mode pull" in command_line("pull-agent")  # the pull agent's group is in pull mode


def test_a_bridge_without_the_managers_signing_key_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support.processes import python_env

    result = subprocess.run(
        [sys.executable, "-m", "local_stack", "bridge"],
        env=python_env(POLICYCAST_DATA_DIR=str(tmp_path / "empty")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "no signing key" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "empty" / "signing_key").exists()
