"""Wire models: every JSON body that crosses a process boundary (REST and MQTT payloads).

The field names are the public contract of DESIGN.md §5: extend them, never rename them. Requests that
an outside client sends forbid unknown fields, so that a typo is a clear 422 rather than a silent no-op.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fabric_core.errors import InvalidDocument

Mode = Literal["push", "pull"]
LogLevel = Literal["debug", "info", "warning", "error", "critical", "security"]
Scope = Literal["group", "location"]

HEARTBEAT_MIN_S = 1
HEARTBEAT_MAX_S = 86_400
MAX_LOG_ENTRIES = 1000
"""Upper bound of one log batch in the model; the manager may set a lower one."""

BatchId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- the effective configuration document ------------------------------------------------------------


class Communication(_Strict):
    """Communications settings as an agent applies them."""

    mode: Mode = "push"
    heartbeat_s: int = Field(default=300, ge=HEARTBEAT_MIN_S, le=HEARTBEAT_MAX_S)
    download_enabled: bool = True
    randomize_s: int = Field(default=0, ge=0, le=HEARTBEAT_MAX_S)


class LocationEntry(_Lenient):
    id: int
    name: str
    is_default: bool
    conditions: list[dict[str, Any]] = Field(default_factory=list)


class PolicyEntry(_Lenient):
    id: int
    name: str
    version: int
    source_group_id: int
    scope: Scope
    body: dict[str, Any]


class ContentEntry(_Lenient):
    revision: int
    manifest_sha256: str


class EffectiveDocument(_Lenient):
    """What one (group, location) must enforce. Lenient so that older agents accept newer documents."""

    serial: int = Field(ge=1)
    group_id: int
    location_id: int
    issued_at: datetime
    communication: Communication
    locations: list[LocationEntry]
    policies: dict[str, PolicyEntry]
    content: dict[str, ContentEntry] = Field(default_factory=dict)

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> EffectiveDocument:
        """Validate a verified document; raise `InvalidDocument` if it is malformed."""
        try:
            return cls.model_validate(doc)
        except ValueError as exc:
            raise InvalidDocument(f"malformed effective document: {exc}") from exc


class Envelope(_Strict):
    """A signed document: `sig` is the base64 Ed25519 signature of the canonical bytes of `doc`."""

    doc: dict[str, Any]
    sig: str
    kid: str


# --- heartbeat ---------------------------------------------------------------------------------------


class LogEntry(_Strict):
    ts: datetime
    level: LogLevel = "info"
    category: str = Field(default="agent", min_length=1, max_length=64)
    message: str = Field(max_length=4096)
    data: dict[str, Any] | None = None


class LogBatch(_Strict):
    """A batch of log entries; the same `batch_id` from the same agent is stored once."""

    batch_id: BatchId
    entries: list[LogEntry] = Field(max_length=MAX_LOG_ENTRIES)


class HeartbeatRequest(_Strict):
    serial: int = Field(ge=0, description="the serial of the document the agent enforces; 0 for none")
    location_id: int | None = Field(default=None, description="the location the agent chose; null: Default")
    mode: Mode
    status: dict[str, Any] = Field(default_factory=dict)
    logs: LogBatch | None = None


class HeartbeatResponse(BaseModel):
    changed: bool
    serial: int
    next_heartbeat_s: int
    config: Envelope | None = Field(default=None, description="the signed document, when changed")


# --- enrolment ---------------------------------------------------------------------------------------


class EnrollRequest(_Strict):
    token: str = Field(min_length=1, max_length=256)
    hostname: str = Field(min_length=1, max_length=255)
    facts: dict[str, Any] = Field(default_factory=dict)


class SigningKeyInfo(BaseModel):
    kid: str
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")


class MqttCredentials(BaseModel):
    url: str
    username: str
    password: str


class EnrollResponse(BaseModel):
    agent_id: str
    secret: str
    group_id: int
    signing_key: SigningKeyInfo
    mqtt: MqttCredentials | None = None
