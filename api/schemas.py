"""Request and response models of the admin API (the agent API's live in `fabric_core.wire`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.params import ROW_ID_MAX
from fabric_core.text import name_rule
from fabric_core.wire import (
    HEARTBEAT_MAX_S,
    HEARTBEAT_MIN_S,
    INT32_MAX,
    Communication,
    Condition,
    LogLevel,
    Mode,
)

NO_NUL = r"^[^\x00]*$"
"""PostgreSQL text cannot hold NUL: refused on every backend, rather than a 500 on one."""
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=128, pattern=NO_NUL),
    name_rule(128),
]
"""A group, location or policy name: trimmed, 1 to 128 characters, Unicode NFC, no control characters."""
PolicyType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
RowRef = Annotated[int, Field(ge=1, le=ROW_ID_MAX)]
"""A row id in a body (a parent, a policy, a group): 1 to 2**63 - 1, as `api.params.RowId` in a path."""


class _In(BaseModel):
    """A request body: unknown fields refused, strict types (`"300"` is not an int, `true` not 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class GroupCreate(_In):
    name: Name
    parent_id: RowRef
    inherit: bool = True


class GroupUpdate(_In):
    name: Name | None = None
    parent_id: RowRef | None = None
    inherit: bool | None = None


class GroupOut(BaseModel):
    id: int
    name: str
    parent_id: int | None
    inherit: bool


class LocationCreate(_In):
    name: Name
    conditions: list[Condition] = Field(default_factory=list)


class LocationUpdate(_In):
    name: Name | None = None
    conditions: list[Condition] | None = None


class LocationOut(BaseModel):
    id: int
    name: str
    is_default: bool
    conditions: list[dict[str, Any]]
    group_id: int = Field(description="the group that owns the location (an ancestor, when inherited)")


class PolicyCreate(_In):
    name: Name
    type: PolicyType
    body: dict[str, Any]


class PolicyUpdate(_In):
    name: Name | None = None
    body: dict[str, Any]


class PolicyOut(BaseModel):
    id: int
    name: str
    type: str
    version: int
    body: dict[str, Any]


class AssignmentIn(_In):
    policy_id: RowRef


class AssignmentOut(BaseModel):
    group_id: int
    location_id: int | None
    type: str
    policy_id: int


class CommunicationIn(_In):
    mode: Mode | None = None
    heartbeat_s: int | None = Field(default=None, ge=HEARTBEAT_MIN_S, le=HEARTBEAT_MAX_S)
    download_enabled: bool | None = None
    randomize_s: int | None = Field(default=None, ge=0, le=HEARTBEAT_MAX_S)


class LocationCommunicationIn(CommunicationIn):
    use_group_settings: bool | None = None


class CommunicationOut(Communication):
    group_id: int = Field(description="the group whose settings these are (an ancestor, when inherited)")


class LocationCommunicationOut(Communication):
    use_group_settings: bool
    effective: Communication = Field(description="what agents at this location apply")


class TokenCreate(_In):
    expires_in_s: int | None = Field(default=None, ge=60, le=365 * 86400)
    max_uses: int | None = Field(default=None, ge=1, le=INT32_MAX)


class TokenOut(BaseModel):
    token: str
    id: int
    group_id: int
    expires_at: datetime
    max_uses: int | None
    ca_hash: str | None = Field(
        description="`sha256:<hex>` of the CA this manager's certificates chain to, which the agent "
        "pins; null when the manager serves plain HTTP (give the agent `--ca-hash` by hand)"
    )
    join_token: str = Field(
        description="the token with the CA hash in it (`<token>.sha256:<hex>`): all `policycast-agent "
        "enroll` needs; the token alone when `ca_hash` is null"
    )


class AgentOut(BaseModel):
    id: str
    hostname: str
    group_id: int
    location_id: int | None
    mode: str
    serial: int = Field(description="the serial the agent reported it holds")
    current_serial: int | None = Field(description="the serial of the document it should hold")
    up_to_date: bool
    last_seen: datetime | None
    online: bool
    enrolled_at: datetime
    revoked: bool


class AgentUpdate(_In):
    group_id: RowRef


class LogOut(BaseModel):
    id: int
    agent_id: str
    group_id: int
    batch_id: str
    ts: datetime
    received_at: datetime
    level: str
    category: str
    message: str
    data: dict[str, Any] | None


LogLevelFilter = LogLevel
