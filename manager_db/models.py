"""SQLModel tables: the manager's state. Every schema change goes through an Alembic migration.

Groups form a tree. A group whose `inherit` flag is on owns nothing: its locations, assignments and
communications settings are those of its nearest ancestor with `inherit` off (its *owner*). The root
never inherits. Communications settings are columns of the group (location-independent) and of each
location (used when `use_group_settings` is off).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, overload

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from fabric_core.settings import DEFAULT_HEARTBEAT_S

ROOT_GROUP_NAME = "My Company"
DEFAULT_LOCATION_NAME = "Default"


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(moment: datetime) -> datetime: ...
@overload
def as_utc(moment: None) -> None: ...
def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class CommunicationColumns(SQLModel):
    """Communications settings, shared by groups and locations."""

    mode: str = Field(default="push", max_length=8)
    heartbeat_s: int = Field(default=DEFAULT_HEARTBEAT_S)
    download_enabled: bool = Field(default=True)
    randomize_s: int = Field(default=0)


class Group(CommunicationColumns, table=True):
    __tablename__ = "groups"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128)
    parent_id: int | None = Field(default=None, foreign_key="groups.id", index=True)
    inherit: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class Location(CommunicationColumns, table=True):
    __tablename__ = "locations"
    __table_args__ = (UniqueConstraint("group_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    group_id: int = Field(foreign_key="groups.id", index=True)
    name: str = Field(max_length=128)
    is_default: bool = Field(default=False)
    conditions: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    use_group_settings: bool = Field(default=True)


class Policy(SQLModel, table=True):
    __tablename__ = "policies"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True)
    type: str = Field(max_length=32, index=True)
    body: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    version: int = Field(default=1)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class Assignment(SQLModel, table=True):
    """A policy applied to a whole group (`location_id` null) or to one of its locations.

    At most one per (group, location, type); the services keep that under the change lock, since a
    unique constraint over a nullable column means different things on SQLite and PostgreSQL.
    """

    __tablename__ = "assignments"

    id: int | None = Field(default=None, primary_key=True)
    group_id: int = Field(foreign_key="groups.id", index=True)
    location_id: int | None = Field(default=None, foreign_key="locations.id", index=True)
    policy_type: str = Field(max_length=32)
    policy_id: int = Field(foreign_key="policies.id", index=True)


class Agent(SQLModel, table=True):
    __tablename__ = "agents"

    id: str = Field(primary_key=True, max_length=32)
    hostname: str = Field(max_length=255)
    group_id: int = Field(foreign_key="groups.id", index=True)
    location_id: int | None = Field(default=None)
    mode: str = Field(default="pull", max_length=8)
    serial: int = Field(default=0, sa_type=BigInteger)
    serial_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    """When the agent first reported the serial it holds (`manager_db.sightings`): with the commit time
    of the change that issued that serial (`ChangeRecord`), how long the change took to reach it."""
    secret_hash: str = Field(max_length=64, unique=True)
    facts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    """When the stored status was reported: an older report never replaces it."""
    enrolled_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    last_seen: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    update_requested: bool = Field(default=False)
    online: bool | None = Field(default=None)
    """Push presence from the broker (retained state, last will); None for an agent never seen on MQTT."""
    acl_group_id: int | None = Field(default=None)
    """The group whose config topics the broker currently lets this agent read; None: no broker account."""
    generation: int = Field(default=0, sa_type=BigInteger, index=True)
    """The change generation that last touched what the heartbeat cache holds of this agent."""


class EnrollmentToken(SQLModel, table=True):
    __tablename__ = "enrollment_tokens"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    group_id: int = Field(foreign_key="groups.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    expires_at: datetime = Field(sa_type=DateTime(timezone=True))
    max_uses: int | None = Field(default=None)
    uses: int = Field(default=0)


class EffectiveConfig(SQLModel, table=True):
    """The current signed document of one (group, location)."""

    __tablename__ = "effective_configs"

    group_id: int = Field(primary_key=True, foreign_key="groups.id")
    location_id: int = Field(primary_key=True)
    is_default: bool = Field(default=False)
    serial: int = Field(sa_type=BigInteger, index=True)
    body_sha256: str = Field(max_length=64)
    """Hash of the document without serial and issued_at: equal hashes mean nothing changed."""
    heartbeat_s: int
    envelope: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class OutboxEntry(SQLModel, table=True):
    """A changed document waiting to be published by a bridge (transactional outbox)."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "published_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    group_id: int
    location_id: int
    serial: int = Field(sa_type=BigInteger)
    envelope: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    published_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class AgentCommandEntry(SQLModel, table=True):
    """An operator command waiting for a bridge to publish it on the agent's cmd topic."""

    __tablename__ = "agent_commands"
    __table_args__ = (Index("ix_agent_commands_pending", "published_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    agent_id: str = Field(max_length=32)
    command: str = Field(max_length=32)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    published_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class BridgeLease(SQLModel, table=True):
    """Which bridge process relays right now: one at a time, so documents leave in serial order."""

    __tablename__ = "bridge_leases"

    name: str = Field(primary_key=True, max_length=32)
    holder: str = Field(max_length=64)
    expires_at: datetime = Field(sa_type=DateTime(timezone=True))


class Blob(SQLModel, table=True):
    """A content file, stored once by its SHA-256 under the data directory (content-addressed)."""

    __tablename__ = "blobs"

    sha256: str = Field(primary_key=True, max_length=64)
    size: int = Field(sa_type=BigInteger)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class ContentRevision(SQLModel, table=True):
    """One numbered revision of a content kind (e.g. definitions): a manifest of files by hash."""

    __tablename__ = "content_revisions"
    __table_args__ = (UniqueConstraint("kind", "revision"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32, index=True)
    revision: int
    manifest: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """[{path, size, sha256}], sorted by path."""
    manifest_sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class LogBatchReceipt(SQLModel, table=True):
    """One row per uploaded batch: a batch retried after a lost response is stored once."""

    __tablename__ = "log_batches"

    agent_id: str = Field(primary_key=True, max_length=32)
    batch_id: str = Field(primary_key=True, max_length=64)
    entries: int
    received_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class LogRecord(SQLModel, table=True):
    __tablename__ = "log_entries"
    __table_args__ = (Index("ix_log_entries_agent_ts", "agent_id", "ts"),)

    id: int | None = Field(default=None, primary_key=True)
    agent_id: str = Field(max_length=32)
    group_id: int = Field(index=True)
    batch_id: str = Field(max_length=64)
    ts: datetime = Field(sa_type=DateTime(timezone=True))
    received_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    level: str = Field(max_length=16)
    category: str = Field(max_length=64)
    message: str
    data: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class AuditEntry(SQLModel, table=True):
    """Who changed what: one row per operator change, written in the change's own transaction."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    actor: str = Field(max_length=128)
    action: str = Field(max_length=64)
    target: str = Field(max_length=128)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    generation: int | None = Field(default=None, sa_type=BigInteger, index=True)
    """The change (`ChangeRecord.generation`) this row was written by; None for rows older than it."""


class ApiKey(SQLModel, table=True):
    """An admin API key, stored hashed. Revoking keeps the row; `last_used_at` is written in batches
    (`api.key_cache.ApiKeyCache.flush`), never by the request that used the key."""

    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128)
    role: str = Field(max_length=16)
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    last_used_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class BootstrapKeyRetirement(SQLModel, table=True):
    """At most one row (id 1): the bootstrap admin key (`POLICYCAST_BOOTSTRAP_ADMIN_KEY`) is retired,
    and every replica refuses it, whatever its environment says."""

    __tablename__ = "bootstrap_key_retirement"

    id: int = Field(default=1, primary_key=True)
    retired_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    retired_by: str = Field(max_length=128)


class ChangeRecord(SQLModel, table=True):
    """One row per committed change, written in the change's own transaction (`api.services.change`):
    when it committed and which serials it issued. Serials are allocated under the change lock, so a
    change's serials are consecutive (`first_serial`..`last_serial`) and later changes have higher ones.
    The convergence SLO is measured from `committed_at` to each agent's report of its new serial."""

    __tablename__ = "changes"

    generation: int = Field(primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False})
    """`FabricCounters.generation` as the change's `begin_change` made it."""
    committed_at: datetime = Field(sa_type=DateTime(timezone=True))
    """Set just before the commit, on the clock of the process that made the change."""
    actor: str = Field(max_length=128)
    first_serial: int | None = Field(default=None, sa_type=BigInteger)
    last_serial: int | None = Field(default=None, sa_type=BigInteger, index=True)
    """None (and `first_serial` too) when the change recomputed no document."""
    documents: int = Field(default=0)
    """How many documents got a new serial."""


class FabricCounters(SQLModel, table=True):
    """A single row. `serial` is the global document counter; `generation` counts committed changes.

    Every change transaction starts by bumping `generation`: that row lock serialises changes on
    PostgreSQL and takes SQLite's write lock up front, and the new value tells the heartbeat caches of
    every process that something changed.
    """

    __tablename__ = "fabric_counters"

    id: int = Field(default=1, primary_key=True)
    serial: int = Field(default=0, sa_type=BigInteger)
    generation: int = Field(default=0, sa_type=BigInteger)


class TrustedCa(SQLModel, table=True):
    """A CA certificate agents trust: every document names them all (`trust.ca_certificates`).

    The manager's own CA is added at its first start; a new one is added before it issues certificates
    (CA rotation) and the old one removed once agents have moved on. A change to this table is a
    change of every document.
    """

    __tablename__ = "trusted_cas"

    sha256: str = Field(primary_key=True, max_length=71)
    """`sha256:<hex>` of the certificate's DER bytes (what agents pin)."""
    pem: str
    added_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class ConsoleSession(SQLModel, table=True):
    """A signed-in operator of the console (`api.console.sessions`). The cookie holds a random id; this
    row holds its hash, the API key it was opened with (so that revoking the key ends the session on
    every replica) and the session's CSRF token. Signing out ends it here, not only in the browser."""

    __tablename__ = "console_sessions"

    id_hash: str = Field(primary_key=True, max_length=64)
    key_hash: str = Field(max_length=64)
    """SHA-256 of the API key that opened the session."""
    csrf_token: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    expires_at: datetime = Field(sa_type=DateTime(timezone=True), index=True)
    ended_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
