"""Settings read from POLICYCAST_* (manager) and POLICYCAST_AGENT_* (agent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from fabric_core.settings import DEFAULT_HEARTBEAT_S, AgentSettings, Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("POLICYCAST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults(tmp_path: Path) -> None:
    settings = Settings()
    assert settings.data_dir == Path(".policycast")
    assert settings.database_url is None
    assert settings.bootstrap_admin_key is None
    assert settings.signing_key is None
    assert settings.mqtt_url == "mqtts://127.0.0.1:8883"  # MQTT over TLS by default
    assert settings.mqtt_prefix == "policycast"
    assert settings.signing_key_path == Path(".policycast") / "signing_key"
    assert (
        settings.resolved_database_url == f"sqlite:///{tmp_path.resolve() / '.policycast' / 'policycast.db'}"
    )


def test_default_heartbeat_is_five_minutes() -> None:
    assert DEFAULT_HEARTBEAT_S == 300


def test_reads_policycast_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLICYCAST_DATA_DIR", str(tmp_path.resolve() / "state"))
    monkeypatch.setenv("POLICYCAST_BOOTSTRAP_ADMIN_KEY", "pck_secret")
    monkeypatch.setenv("POLICYCAST_SIGNING_KEY", "c2VlZA==")
    monkeypatch.setenv("POLICYCAST_MQTT_URL", "mqtts://broker.example:8883")
    monkeypatch.setenv("POLICYCAST_MQTT_PREFIX", "acme/pc")
    monkeypatch.setenv("POLICYCAST_HEARTBEAT_JITTER", "0.25")
    monkeypatch.setenv("POLICYCAST_HEARTBEAT_FLUSH_S", "0.5")
    monkeypatch.setenv("POLICYCAST_CACHE_REFRESH_S", "3")
    monkeypatch.setenv("POLICYCAST_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("POLICYCAST_MAX_LOG_ENTRIES", "10")
    monkeypatch.setenv("POLICYCAST_ENROLLMENT_TOKEN_TTL_S", "3600")
    settings = Settings()
    assert settings.data_dir == tmp_path.resolve() / "state"
    assert settings.bootstrap_admin_key is not None
    assert settings.bootstrap_admin_key.get_secret_value() == "pck_secret"
    assert "pck_secret" not in repr(settings)
    assert settings.signing_key is not None
    assert settings.signing_key.get_secret_value() == "c2VlZA=="
    assert settings.mqtt_url == "mqtts://broker.example:8883"
    assert settings.mqtt_prefix == "acme/pc"
    assert settings.heartbeat_jitter == 0.25
    assert settings.heartbeat_flush_s == 0.5
    assert settings.cache_refresh_s == 3.0
    assert settings.max_body_bytes == 2048
    assert settings.max_log_entries == 10
    assert settings.enrollment_token_ttl_s == 3600
    assert settings.signing_key_path == tmp_path.resolve() / "state" / "signing_key"


def test_env_var_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("policycast_mqtt_url", "mqtt://lower:1883")
    assert Settings().mqtt_url == "mqtt://lower:1883"


def test_database_url_defaults_to_sqlite_under_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("POLICYCAST_DATA_DIR", str(tmp_path.resolve() / "data"))
    assert Settings().resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'policycast.db'}"


def test_relative_data_dir_resolves_to_an_absolute_sqlite_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("POLICYCAST_DATA_DIR", "rel/dir")
    url = Settings().resolved_database_url
    assert url == f"sqlite:///{tmp_path.resolve() / 'rel' / 'dir' / 'policycast.db'}"
    assert Path(url.removeprefix("sqlite:///")).is_absolute()


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://user:pw@db:5432/policycast", "sqlite:////var/lib/pc.db", "sqlite:///:memory:"],
)
def test_explicit_database_url_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str) -> None:
    monkeypatch.setenv("POLICYCAST_DATA_DIR", str(tmp_path.resolve() / "data"))
    monkeypatch.setenv("POLICYCAST_DATABASE_URL", url)
    settings = Settings()
    assert settings.database_url == url
    assert settings.resolved_database_url == url


def test_constructor_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICYCAST_MQTT_URL", "mqtt://env:1883")
    assert Settings(mqtt_url="mqtt://arg:1883").mqtt_url == "mqtt://arg:1883"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POLICYCAST_HEARTBEAT_JITTER", "0.6"),
        ("POLICYCAST_HEARTBEAT_JITTER", "-0.1"),
        ("POLICYCAST_HEARTBEAT_FLUSH_S", "0"),
        ("POLICYCAST_CACHE_REFRESH_S", "-1"),
        ("POLICYCAST_MAX_BODY_BYTES", "1023"),
        ("POLICYCAST_MAX_LOG_ENTRIES", "0"),
        ("POLICYCAST_ENROLLMENT_TOKEN_TTL_S", "59"),
        ("POLICYCAST_MAX_BODY_BYTES", "lots"),
    ],
)
def test_out_of_range_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_unrelated_environment_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICYCAST_SOMETHING_ELSE", "x")
    monkeypatch.setenv("MQTT_URL", "mqtt://unprefixed:1883")
    assert Settings().mqtt_url == "mqtts://127.0.0.1:8883"


def test_agent_settings_defaults() -> None:
    settings = AgentSettings()
    assert settings.state_dir == Path(".policycast-agent")
    assert settings.retry_min_s == 1.0
    assert settings.retry_max_s == 300.0
    assert settings.request_timeout_s == 10.0


def test_agent_settings_read_policycast_agent_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("POLICYCAST_AGENT_STATE_DIR", str(tmp_path.resolve() / "agent"))
    monkeypatch.setenv("POLICYCAST_AGENT_RETRY_MIN_S", "0.5")
    monkeypatch.setenv("POLICYCAST_AGENT_RETRY_MAX_S", "60")
    monkeypatch.setenv("POLICYCAST_AGENT_REQUEST_TIMEOUT_S", "2.5")
    settings = AgentSettings()
    assert settings.state_dir == tmp_path.resolve() / "agent"
    assert settings.retry_min_s == 0.5
    assert settings.retry_max_s == 60.0
    assert settings.request_timeout_s == 2.5


def test_agent_settings_ignore_manager_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICYCAST_STATE_DIR", "/wrong")
    monkeypatch.setenv("POLICYCAST_DATA_DIR", "/wrong")
    assert AgentSettings().state_dir == Path(".policycast-agent")


@pytest.mark.parametrize(
    "name",
    ["POLICYCAST_AGENT_RETRY_MIN_S", "POLICYCAST_AGENT_RETRY_MAX_S", "POLICYCAST_AGENT_REQUEST_TIMEOUT_S"],
)
@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_agent_settings_reject_non_positive_durations(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        AgentSettings()


def test_the_bridge_serves_metrics_on_its_port_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert (settings.bridge_metrics_host, settings.bridge_metrics_port) == ("127.0.0.1", 9465)
    assert settings.metrics_cache_s == 5.0
    for off in ("off", "OFF", "none", ""):
        monkeypatch.setenv("POLICYCAST_BRIDGE_METRICS_PORT", off)
        assert Settings().bridge_metrics_port is None
    monkeypatch.setenv("POLICYCAST_BRIDGE_METRICS_PORT", "0")  # a free port, logged
    assert Settings().bridge_metrics_port == 0
    monkeypatch.setenv("POLICYCAST_BRIDGE_METRICS_PORT", "65536")
    with pytest.raises(ValidationError):
        Settings()
