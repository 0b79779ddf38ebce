"""Request and response models of the admin API (the agent API's live in `fabric_core.wire`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fabric_core.wire import HEARTBEAT_MAX_S, HEARTBEAT_MIN_S, Communication, Condition, LogLevel, Mode

NO_NUL = r"^[^\x00]*$"
"""PostgreSQL text cannot hold NUL: refused on every backend, rather than a 500 on one."""
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128, pattern=NO_NUL)]
PolicyType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GroupCreate(_In):
    name: Name
    parent_id: int
    inherit: bool = True


class GroupUpdate(_In):
    name: Name | None = None
    parent_id: int | None = None
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
    policy_id: int


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
    max_uses: int | None = Field(default=None, ge=1)


class TokenOut(BaseModel):
    token: str
    id: int
    group_id: int
    expires_at: datetime
    max_uses: int | None


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
    group_id: int


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
