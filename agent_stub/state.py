"""Where an agent keeps what must survive a restart: its identity, the applied envelope and a status.

`StateStore` is the one seam between the agent's logic and storage. `FileStateStore` is the real agent's
(a private directory of small JSON files, each replaced atomically); `MemoryStateStore` serves tests and
the fleet simulator, where thousands of agents share one process and must not block the event loop.

Stores are synchronous on purpose: the files are tiny and written rarely (once per applied document and
once per heartbeat), and a synchronous seam keeps `AgentCore` free of any transport or event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent_stub.errors import CorruptStateError
from agent_stub.files import write_atomically
from fabric_core.errors import PolicycastError
from fabric_core.serials import NO_SERIAL
from fabric_core.settings import MqttAddress
from fabric_core.tls import split_certificates
from fabric_core.topics import DEFAULT_PREFIX, check_prefix
from fabric_core.wire import EnrollResponse, Mode, MqttCredentials, SigningKeyInfo

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
CURRENT_FILE = "current.json"
STATUS_FILE = "status.json"
CONTENT_DIR = "content"
"""Content downloads (`agent_stub.content`): blobs, partial files and one tree per revision."""
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class StoredMqttCredentials(MqttCredentials):
    """The broker account learnt at enrolment, plus what the agent may keep beside it.

    `prefix` comes from enrolment; `mqtt_prefix`, set by hand, is kept for identities stored before the
    enrolment response carried it (None in both: the default prefix).
    """

    # from_attributes: an `Identity` may also be built from the plain wire model.
    model_config = ConfigDict(extra="ignore", from_attributes=True)

    mqtt_prefix: str | None = None

    @classmethod
    def from_wire(cls, credentials: MqttCredentials | None) -> StoredMqttCredentials | None:
        return None if credentials is None else cls.model_validate(credentials.model_dump())


def credentials_problem(credentials: MqttCredentials) -> str | None:
    """Why broker credentials cannot be used (a broker URL or topic prefix that does not parse), or None."""
    try:
        for url in credentials.broker_urls:
            MqttAddress.parse(url)
        check_prefix(credentials.prefix or getattr(credentials, "mqtt_prefix", None) or DEFAULT_PREFIX)
    except (ValueError, PolicycastError) as exc:
        return str(exc)
    return None


class Identity(BaseModel):
    """Who the agent is and whom it trusts, as learnt at enrolment."""

    agent_id: str
    secret: str = Field(repr=False)
    server: str
    group_id: int
    signing_key: SigningKeyInfo
    mqtt: StoredMqttCredentials | None = Field(default=None, repr=False)
    hostname: str | None = None
    trusted_cas: list[str] = Field(default_factory=list, repr=False)
    """The CA certificates (PEM) the agent trusts for HTTPS and MQTTS, and nothing else: the one pinned
    at enrolment, then those its documents name (`agent_stub.trust`). Empty: enrolled over plain HTTP
    (`--insecure-http`) or stored before agents pinned a CA; the system's trust store then applies."""

    @field_validator("trusted_cas")
    @classmethod
    def _shared(cls, cas: list[str]) -> list[str]:
        for pem in cas:
            if len(split_certificates(pem.encode("ascii", "replace"))) != 1:
                raise ValueError("each trusted CA is one PEM certificate")
        # One copy of each certificate however many identities name it (the fleet simulator's thousands).
        return [sys.intern(pem) for pem in cas]

    @classmethod
    def from_enrollment(
        cls, *, server: str, response: EnrollResponse, hostname: str, trusted_cas: Sequence[str] = ()
    ) -> Identity:
        return cls(
            agent_id=response.agent_id,
            secret=response.secret,
            server=server,
            group_id=response.group_id,
            signing_key=response.signing_key,
            mqtt=StoredMqttCredentials.from_wire(response.mqtt),
            hostname=hostname,
            trusted_cas=list(trusted_cas),
        )


class AgentStatus(BaseModel):
    """A small summary for operators on the host (`policycast-agent status`); never trusted as state."""

    serial: int = NO_SERIAL
    location_id: int | None = None
    mode: Mode = "pull"
    transport: Mode | None = None
    """How the running agent talks to the manager ("push" while its MQTT session is up); None: stopped."""
    last_heartbeat_at: datetime | None = None
    next_heartbeat_at: datetime | None = None
    last_error: str | None = None


class StateStore(Protocol):
    """Persistence of one agent. `load_*` return None when nothing was stored yet."""

    def load_identity(self) -> Identity | None: ...

    def save_identity(self, identity: Identity) -> None: ...

    def load_current(self) -> bytes | None:
        """The raw envelope last applied; callers verify it again before trusting it."""
        ...

    def save_current(self, envelope: bytes) -> None: ...

    def load_status(self) -> AgentStatus | None: ...

    def save_status(self, status: AgentStatus) -> None: ...

    def reset(self) -> None:
        """Forget the applied document and the status (before a re-enrolment)."""
        ...


class MemoryStateStore:
    """Keeps everything in memory: for tests and simulated agents."""

    def __init__(self, identity: Identity | None = None) -> None:
        self.identity = identity
        self.current: bytes | None = None
        self.status: AgentStatus | None = None

    def load_identity(self) -> Identity | None:
        return self.identity

    def save_identity(self, identity: Identity) -> None:
        self.identity = identity

    def load_current(self) -> bytes | None:
        return self.current

    def save_current(self, envelope: bytes) -> None:
        self.current = bytes(envelope)

    def load_status(self) -> AgentStatus | None:
        return self.status.model_copy() if self.status else None

    def save_status(self, status: AgentStatus) -> None:
        self.status = status.model_copy()

    def reset(self) -> None:
        self.current = None
        self.status = None


class FileStateStore:
    """One private directory (0700) of JSON files (0600), each replaced atomically.

    The directory is created on the first write, so that read-only commands (`status`) do not leave
    an empty state directory behind.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    # --- identity ----------------------------------------------------------------------------------

    def load_identity(self) -> Identity | None:
        data = self._read(IDENTITY_FILE)
        if data is None:
            return None
        try:
            return Identity.model_validate_json(data)
        except ValidationError as exc:
            raise CorruptStateError(
                f"{self.state_dir / IDENTITY_FILE} is not a valid identity: {exc}"
            ) from exc

    def save_identity(self, identity: Identity) -> None:
        self._write(IDENTITY_FILE, identity.model_dump_json(indent=2).encode())

    # --- the applied envelope ----------------------------------------------------------------------

    def load_current(self) -> bytes | None:
        try:
            return self._read(CURRENT_FILE)
        except OSError as exc:
            # The agent then runs as if it held nothing and fetches the current document again.
            log.warning("cannot read %s, treating it as absent: %s", self.state_dir / CURRENT_FILE, exc)
            return None

    def save_current(self, envelope: bytes) -> None:
        self._write(CURRENT_FILE, envelope)

    # --- status ------------------------------------------------------------------------------------

    def load_status(self) -> AgentStatus | None:
        try:
            data = self._read(STATUS_FILE)
            return AgentStatus.model_validate_json(data) if data is not None else None
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable %s: %s", self.state_dir / STATUS_FILE, exc)
            return None

    def save_status(self, status: AgentStatus) -> None:
        self._write(STATUS_FILE, status.model_dump_json(indent=2).encode())

    def reset(self) -> None:
        for name in (CURRENT_FILE, STATUS_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / name).unlink()

    # --- files -------------------------------------------------------------------------------------

    def _read(self, name: str) -> bytes | None:
        try:
            return (self.state_dir / name).read_bytes()
        except FileNotFoundError:
            return None

    def _ensure_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        # The directory holds the agent's secret: tighten it even if it already existed.
        os.chmod(self.state_dir, _DIR_MODE)

    def _write(self, name: str, data: bytes) -> None:
        """Write `name` so that a reader sees the old bytes or the new ones, never a torn file."""
        self._ensure_dir()
        write_atomically(self.state_dir / name, data, mode=_FILE_MODE)
