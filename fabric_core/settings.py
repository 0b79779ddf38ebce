"""Settings, read once from the environment (prefix `POLICYCAST_`) and passed down explicitly.

Nothing else in Policycast reads the environment: a process builds one `Settings` (manager, bridge) or
`AgentSettings` (agent) at its entry point and hands it to what it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fabric_core.topics import DEFAULT_PREFIX

DEFAULT_HEARTBEAT_S = 300
"""SEPM's default heartbeat: five minutes."""
DEFAULT_BRIDGE_METRICS_PORT = 9465
"""Next to the OpenTelemetry exporters' 9464 in Prometheus's list of exporter ports."""
_OFF = frozenset({"", "off", "none", "false", "no"})


@dataclass(frozen=True, slots=True)
class MqttAddress:
    """Where a broker listens: `mqtt://host:port` (plain) or `mqtts://host:port` (TLS)."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> MqttAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp") or not parts.hostname:
            raise ValueError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ValueError(f"broker URL {url!r} has an invalid port") from exc
        return cls(parts.hostname, port, tls)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_addresses(urls: str) -> list[MqttAddress]:
    """Broker URLs, comma-separated (one at least), in order."""
    addresses = [MqttAddress.parse(url.strip()) for url in urls.split(",") if url.strip()]
    if not addresses:
        raise ValueError(f"no broker URL in {urls!r}")
    return addresses


class Settings(BaseSettings):
    """The manager's settings (api, bridge, CLI)."""

    model_config = SettingsConfigDict(env_prefix="POLICYCAST_", extra="ignore")

    data_dir: Path = Path(".policycast")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file policycast.db in data_dir"
    )
    bootstrap_admin_key: SecretStr | None = Field(
        default=None, description="An admin API key accepted from the first start"
    )
    console_session_ttl_s: int = Field(
        default=8 * 3600,
        ge=60,
        le=30 * 86400,
        description="how long a console sign-in lasts (the API key's expiry or revocation ends it sooner)",
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="Base64 Ed25519 seed; default: data_dir/signing_key (created on first start). "
        "Every api replica must use the same key.",
    )
    broker_engine: Literal["mosquitto", "nats"] = Field(
        default="mosquitto", description="the MQTT broker behind push (broker_bridge.engine)"
    )
    nats_urls: str | None = Field(
        default=None,
        description="nats: the cluster's NATS client URLs (tls://host:port, comma-separated), where the "
        "bridge pushes account updates as the system user; default: the MQTT hosts on port 4222",
    )
    nats_keys: SecretStr | None = Field(
        default=None,
        description="nats: the operator, account and system seeds (the JSON of data_dir/nats_keys.json); "
        "default: that file, made by the first broker-config. Every replica must use the same keys.",
    )
    nats_credentials_ttl_s: int = Field(
        default=3600, ge=60, description="nats: how long an agent's user JWT is valid (renewed by heartbeat)"
    )
    mosquitto_plugin: str | None = Field(
        default=None, description="path of mosquitto_dynamic_security.so; default: the usual install paths"
    )
    tls_enabled: bool = Field(
        default=True,
        description="serve HTTPS; false only behind a TLS-terminating proxy (a warning is printed at start)",
    )
    tls_names: str = Field(
        default="localhost,127.0.0.1,::1",
        description="comma-separated DNS names and IP addresses in the api's and the broker's certificates",
    )
    tls_cert_file: Path | None = Field(
        default=None, description="the operator's server certificate chain (PEM); default: issued by the CA"
    )
    tls_key_file: Path | None = Field(default=None, description="the key of tls_cert_file (PEM)")
    tls_ca_file: Path | None = Field(
        default=None, description="the CA that issued tls_cert_file (PEM), which agents pin"
    )
    mqtt_url: str = Field(
        default="mqtts://127.0.0.1:8883",
        description="the broker, as the bridge reaches it (MQTT over TLS); a cluster: its nodes' URLs, "
        "comma-separated (the bridge fails over among them)",
    )
    mqtt_public_url: str | None = Field(
        default=None,
        description="the broker as agents reach it, one URL or a comma-separated list (sent at "
        "enrolment: agents fail over among them); default: mqtt_url",
    )
    mqtt_prefix: str = DEFAULT_PREFIX
    mqtt_username: str = Field(default="policycast-bridge", description="the bridge's broker account")
    mqtt_password: SecretStr | None = Field(
        default=None, description="the bridge's broker password; default: derived from the signing key"
    )
    mqtt_enabled: bool = Field(default=True, description="offer push mode (MQTT credentials at enrolment)")
    bridge_batch: int = Field(default=500, ge=1, description="outbox rows a bridge publishes per round")
    bridge_poll_s: float = Field(default=0.2, gt=0, description="how often an idle bridge looks for work")
    anti_entropy_s: float = Field(
        default=2.0, gt=0, description="how often the bridge looks for push agents behind their document"
    )
    anti_entropy_grace_s: float = Field(
        default=5.0,
        gt=0,
        description="how long a push agent may stay behind a published document before it is repaired",
    )
    republish_all_s: float = Field(
        default=300.0, gt=0, description="how often the bridge republishes every retained document"
    )
    command_resend_s: float = Field(
        default=5.0, gt=0, description="how long before an unanswered command is sent again"
    )
    bridge_metrics_port: int | None = Field(
        default=DEFAULT_BRIDGE_METRICS_PORT,
        ge=0,
        le=65535,
        description="where the bridge serves Prometheus metrics (/metrics); 0: a free port, logged; "
        "off: not served",
    )
    bridge_metrics_host: str = Field(
        default="127.0.0.1", description="the address the bridge's metrics listen on (0.0.0.0: every one)"
    )
    metrics_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="how long a metric read from SQL (agents, outbox) is kept: a storm of scrapes "
        "costs one query per this",
    )
    heartbeat_jitter: float = Field(default=0.1, ge=0.0, le=0.5, description="+/- fraction of heartbeat_s")
    heartbeat_flush_s: float = Field(
        default=2.0, gt=0, description="how often heartbeat bookkeeping is written"
    )
    cache_refresh_s: float = Field(default=1.0, gt=0, description="how often the document cache polls SQL")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="largest request body accepted")
    max_log_entries: int = Field(default=1000, ge=1, description="largest log batch accepted")
    enrollment_token_ttl_s: int = Field(default=7 * 86400, ge=60)
    content_retention: int = Field(default=30, ge=1, description="revisions kept per content kind")
    max_blob_bytes: int = Field(default=512 * 1024 * 1024, ge=1024, description="largest content file")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'policycast.db').resolve()}"

    @property
    def signing_key_path(self) -> Path:
        return self.data_dir / "signing_key"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def tls_name_list(self) -> list[str]:
        return [name.strip() for name in self.tls_names.split(",") if name.strip()]

    @field_validator("bridge_metrics_port", mode="before")
    @classmethod
    def _off_is_none(cls, value: object) -> object:
        """`POLICYCAST_BRIDGE_METRICS_PORT=off` turns the bridge's metrics off."""
        return None if isinstance(value, str) and value.strip().lower() in _OFF else value

    @model_validator(mode="after")
    def _operator_certificates_come_in_threes(self) -> Settings:
        given = [f for f in (self.tls_cert_file, self.tls_key_file, self.tls_ca_file) if f is not None]
        if given and len(given) != 3:
            raise ValueError("set all three of tls_cert_file, tls_key_file and tls_ca_file, or none")
        return self

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def mqtt_addresses(self) -> list[MqttAddress]:
        """Every broker node the bridge may connect to (`mqtt_url`, comma-separated)."""
        return parse_addresses(self.mqtt_url)

    @property
    def mqtt_address(self) -> MqttAddress:
        """The first of `mqtt_addresses`."""
        return self.mqtt_addresses[0]

    @property
    def mqtt_public_addresses(self) -> list[MqttAddress]:
        """Every broker node agents are told about (`mqtt_public_url`, else `mqtt_url`)."""
        return parse_addresses(self.mqtt_public_url or self.mqtt_url)

    @property
    def mqtt_public_address(self) -> MqttAddress:
        return self.mqtt_public_addresses[0]

    @property
    def nats_url_list(self) -> list[str]:
        """The NATS client URLs of the cluster (`nats_urls`), else each MQTT host on port 4222."""
        if self.nats_urls:
            return [url.strip() for url in self.nats_urls.split(",") if url.strip()]
        return [f"tls://{address.host}:4222" for address in self.mqtt_addresses]


class AgentSettings(BaseSettings):
    """The reference agent's settings."""

    model_config = SettingsConfigDict(env_prefix="POLICYCAST_AGENT_", extra="ignore")

    state_dir: Path = Path(".policycast-agent")
    retry_min_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    request_timeout_s: float = Field(default=10.0, gt=0)
    mqtt_keepalive_s: int = Field(default=60, ge=5, le=3600)
    mqtt_session_expiry_s: int = Field(
        default=7 * 86400, ge=0, description="how long the broker keeps the agent's session while it is away"
    )
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    location_check_s: float = Field(
        default=120.0, gt=0, description="how often the agent re-evaluates its location"
    )
    facts_check_s: float = Field(
        default=5.0, gt=0, description="how often the agent looks for changed host facts"
    )
    facts_file: Path | None = Field(
        default=None, description="JSON overriding host facts (tests, simulation)"
    )
    log_priority_delay_s: float = Field(
        default=60.0, gt=0, description="security log entries reach the manager within this, heartbeat or not"
    )
    log_spool_max_entries: int = Field(default=10_000, ge=10, description="log entries kept while offline")
    log_batch_size: int = Field(default=500, ge=1, le=1000, description="log entries per upload")
