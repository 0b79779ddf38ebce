"""Wire models: every JSON body that crosses a process boundary (REST and MQTT payloads).

The field names are the public contract of DESIGN.md §5: extend them, never rename them. Requests that
an outside client sends forbid unknown fields, so that a typo is a clear 422 rather than a silent no-op.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from fabric_core.errors import InvalidDocument
from fabric_core.patterns import MAX_PATTERN_LENGTH, compile_pattern
from fabric_core.serials import NO_SERIAL, SERIAL_MAX
from fabric_core.text import Text, name_rule

Mode = Literal["push", "pull"]
LogLevel = Literal["debug", "info", "warning", "error", "critical", "security"]
Scope = Literal["group", "location"]
MqttProtocol = Literal["5", "3.1.1"]

HEARTBEAT_MIN_S = 1
HEARTBEAT_MAX_S = 86_400
MAX_LOG_ENTRIES = 1000
"""Upper bound of one log batch in the model; the manager may set a lower one."""

BatchId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
"""The bounds of an INTEGER column (ids on PostgreSQL, counters such as `max_uses`)."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""The bounds of a BIGINT: no integer the manager takes in a request lies outside them."""
AnyId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
"""An id that may name nothing (a location an agent reports: unknown means Default)."""


def _representable_in_utc(moment: datetime) -> datetime:
    """Refuse a moment that has no UTC equivalent (year 1 with a positive offset, year 9999 with a
    negative one): it would overflow where the manager stores or compares it in UTC."""
    try:
        moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError as exc:
        raise ValueError("the moment lies outside the years 1 to 9999 in UTC") from exc
    return moment


Moment = Annotated[datetime, Field(strict=False), AfterValidator(_representable_in_utc)]
"""A datetime in a request: an ISO 8601 string in JSON (not strict: JSON has no datetime type)."""


class _Strict(BaseModel):
    """A request model: unknown fields refused, and strict types (`"300"` is not an int, `true` not 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- the effective configuration document ------------------------------------------------------------


class Communication(_Strict):
    """Communications settings as an agent applies them."""

    mode: Mode = "push"
    heartbeat_s: int = Field(default=300, ge=HEARTBEAT_MIN_S, le=HEARTBEAT_MAX_S)
    download_enabled: bool = True
    randomize_s: int = Field(default=0, ge=0, le=HEARTBEAT_MAX_S)


# --- location conditions -----------------------------------------------------------------------------


class _Condition(_Strict):
    weight: int = Field(default=1, ge=1, le=1000, description="added to the location's score when matched")


class IpRangeCondition(_Condition):
    """One of the host's addresses lies in `cidr` (e.g. 10.1.0.0/16)."""

    type: Literal["ip_range"]
    cidr: str = Field(min_length=1, max_length=64)

    @field_validator("cidr")
    @classmethod
    def _network(cls, value: str) -> str:
        ipaddress.ip_network(value, strict=False)
        return value


class _AddressCondition(_Condition):
    """A condition on one IP address of the host's network configuration."""

    address: str = Field(min_length=1, max_length=64)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class DnsServerCondition(_AddressCondition):
    """One of the host's DNS servers is `address`."""

    type: Literal["dns_server"]


class GatewayCondition(_AddressCondition):
    """The host's default gateway is `address`."""

    type: Literal["gateway"]


class NetworkTypeCondition(_Condition):
    type: Literal["network_type"]
    value: Literal["ethernet", "wireless", "vpn"]


class FactCondition(_Condition):
    """A host fact equals `equals`, or matches the regular expression `matches`."""

    type: Literal["fact"]
    name: Text = Field(min_length=1, max_length=64)
    equals: Text | None = Field(default=None, max_length=4096)
    matches: Text | None = Field(
        default=None,
        max_length=MAX_PATTERN_LENGTH,
        description="an RE2 regular expression (linear time: no back-references, no look-around)",
    )

    @model_validator(mode="after")
    def _one_test(self) -> FactCondition:
        if (self.equals is None) == (self.matches is None):
            raise ValueError("a fact condition needs exactly one of equals or matches")
        if self.matches is not None:
            compile_pattern(self.matches)  # PatternError is a ValueError: a 422 saying why
        return self


class ManagerReachableCondition(_Condition):
    """The manager answers (`reachable: true`) or does not (`reachable: false`, SEPM's "cannot connect").

    Alone, the "cannot connect" form sends every agent to this location whenever the manager is down,
    wherever the agents really are (SEPM users learned this the hard way): pair it with a network
    condition. Alone, the "can reach" form catches every agent that reaches the manager.
    """

    type: Literal["manager_reachable"]
    reachable: bool = True


Condition = Annotated[
    IpRangeCondition
    | DnsServerCondition
    | GatewayCondition
    | NetworkTypeCondition
    | FactCondition
    | ManagerReachableCondition,
    Field(discriminator="type"),
]


class DocumentCommunication(_Lenient):
    """Communications settings inside a document: lenient, so a newer manager may add fields."""

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


class DocumentTrust(_Lenient):
    """The CA certificates (PEM) the manager's api and broker chain to: agents trust exactly these
    from the document on, which is how a new CA reaches them before the old one is retired."""

    ca_certificates: list[str] = Field(min_length=1)


class EffectiveDocument(_Lenient):
    """What one (group, location) must enforce. Lenient so that older agents accept newer documents."""

    serial: int = Field(ge=1)
    group_id: int
    location_id: int
    issued_at: datetime
    communication: DocumentCommunication
    locations: list[LocationEntry]
    policies: dict[str, PolicyEntry]
    content: dict[str, ContentEntry] = Field(default_factory=dict)
    trust: DocumentTrust | None = Field(
        default=None, description="absent: the manager names no CAs (plain HTTP behind a proxy)"
    )

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
    ts: Moment
    level: LogLevel = "info"
    category: Text = Field(default="agent", min_length=1, max_length=64)
    message: Text = Field(max_length=4096)
    data: dict[str, Any] | None = None


class LogBatch(_Strict):
    """A batch of log entries; the same `batch_id` from the same agent is stored once."""

    batch_id: BatchId
    entries: list[LogEntry] = Field(max_length=MAX_LOG_ENTRIES)


class HeartbeatRequest(_Strict):
    serial: int = Field(
        ge=NO_SERIAL, le=SERIAL_MAX, description="the serial of the document the agent enforces; 0 for none"
    )
    location_id: AnyId | None = Field(
        default=None, description="the location the agent chose; null (or one not of its group): Default"
    )
    mode: Mode
    status: dict[str, Any] | None = Field(
        default=None,
        description=(
            "free-form, kept on the agent row (`content`: `{kind: revision}`, the content revisions held). "
            "Absent or null: unchanged since the last status the manager acknowledged with a 2xx; the "
            "manager keeps what it holds (`{}` if the agent never sent one). An object replaces it."
        ),
    )
    logs: LogBatch | None = None
    mqtt_expires_at: int | None = Field(
        default=None,
        ge=0,
        le=2**40,
        description=(
            "push agents whose broker password expires (NATS JWTs): when it does, in Unix seconds. "
            "The manager answers fresh credentials (`mqtt`) once it is due for renewal"
        ),
    )


class HeartbeatResponse(BaseModel):
    changed: bool
    serial: int
    next_heartbeat_s: int
    config: Envelope | None = Field(default=None, description="the signed document, when changed")
    mqtt: MqttCredentials | None = Field(
        default=None, description="new broker credentials (a renewed or re-scoped NATS JWT): use them now"
    )


# --- MQTT payloads (push mode) -----------------------------------------------------------------------


class AgentStateReport(_Lenient):
    """What an agent publishes, retained, on its state topic; its last will is `{agent_id, online: false}`."""

    agent_id: str = Field(min_length=1, max_length=64)
    online: bool
    serial: int | None = Field(default=None, ge=0, le=SERIAL_MAX)
    group_id: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    location_id: int | None = Field(
        default=None, ge=INT32_MIN, le=INT32_MAX, description="stored as reported (an INTEGER column)"
    )
    mode: Mode | None = None
    at: datetime | None = None


AgentCommandName = Literal["update_now", "credentials"]


class AgentCommand(_Lenient):
    """What the manager sends an agent on its cmd topic (QoS 1, not retained; on NATS QoS 0, re-sent
    until the agent shows it acted).

    `update_now`: heartbeat at once. `credentials`: reconnect to the broker with `mqtt` (NATS: a new
    JWT after a group move)."""

    command: AgentCommandName
    id: str = Field(min_length=1, max_length=64, description="unique per command, for logs and dedup")
    issued_at: datetime
    mqtt: MqttCredentials | None = Field(default=None, description="with `credentials`: what to use now")


# --- enrolment ---------------------------------------------------------------------------------------


class EnrollRequest(_Strict):
    token: Text = Field(min_length=1, max_length=256)
    hostname: Annotated[str, Field(min_length=1, max_length=255), name_rule(255)] = Field(
        description="normalised to Unicode NFC; no control characters"
    )
    facts: dict[str, Any] = Field(default_factory=dict)


class SigningKeyInfo(BaseModel):
    kid: str
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")


class MqttDelivery(BaseModel):
    """How an agent subscribes: what the broker engine delivers reliably (DESIGN.md section 4).

    Mosquitto keeps a persistent session and QoS 1 per agent; a NATS cluster makes every QoS 1
    subscription a JetStream consumer, so its agents take QoS 0 on a clean session (anti-entropy
    repairs what is lost). Absent in an older enrolment: QoS 1 on a persistent session.
    """

    qos: Literal[0, 1] = 1
    persistent_session: bool = Field(
        default=True, description="keep the session (subscriptions, queued commands) while disconnected"
    )
    protocol: MqttProtocol = Field(
        default="5", description="the MQTT version the broker speaks: 5 (Mosquitto) or 3.1.1 (NATS)"
    )


class MqttCredentials(BaseModel):
    """How a push agent reaches the broker: where, as whom, and how to subscribe."""

    url: str = Field(description="one broker URL (the first of `urls`), for agents that know only one")
    urls: list[str] = Field(
        default_factory=list,
        description="every broker node; an agent connects to one at random and fails over to the others",
    )
    username: str
    password: str = Field(description="the account's password, or (NATS) the agent's bearer user JWT")
    prefix: str | None = Field(default=None, description="the topic prefix; null: the default, policycast")
    delivery: MqttDelivery = Field(default_factory=MqttDelivery)
    expires_at: datetime | None = Field(
        default=None,
        description="when the password stops working (NATS JWTs); null: never. Refreshed by heartbeat",
    )

    @property
    def broker_urls(self) -> list[str]:
        """Every URL to try: `urls`, or the one `url` of an older enrolment."""
        return list(self.urls) or [self.url]


class EnrollResponse(BaseModel):
    agent_id: str
    secret: str
    group_id: int
    signing_key: SigningKeyInfo
    mqtt: MqttCredentials | None = None


# Defined before the credentials they carry.
HeartbeatResponse.model_rebuild()
AgentCommand.model_rebuild()


def heartbeat_response_bytes(
    *,
    changed: bool,
    serial: int,
    next_heartbeat_s: int,
    envelope: bytes | None,
    mqtt: bytes | None = None,
) -> bytes:
    """The JSON of a `HeartbeatResponse`, splicing in already-signed envelope bytes without re-encoding.

    The hot path answers thousands of heartbeats a second: the envelope is signed and serialised once
    when the document changes, and every heartbeat that needs it reuses those bytes. `mqtt`: the JSON of
    new `MqttCredentials` (rare: a renewal), spliced in the same way.
    """
    head = b'{"changed":%s,"serial":%d,"next_heartbeat_s":%d' % (
        b"true" if changed else b"false",
        serial,
        next_heartbeat_s,
    )
    if mqtt is None:
        if envelope is None:
            return head + b"}"
        return head + b',"config":' + envelope + b"}"
    if envelope is not None:
        head += b',"config":' + envelope
    return head + b',"mqtt":' + mqtt + b"}"
