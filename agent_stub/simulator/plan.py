"""What to simulate: the plan of a fleet, where its agents sit, and the identities kept between runs.

Agents are spread round-robin over groups and, within a group, over locations: agent `i` reports the host
fact `site` = `site-k` (none for the Default location), and the group's location `site-k` has a condition
on that fact. A (group, location) is a `DocumentKey`, written `g/l` in the control protocol. Identities
are kept in a file (`--identities`, 0600: it holds every agent's secret) so that a later run reuses them
instead of enrolling again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agent_stub.files import write_atomically
from agent_stub.state import Identity
from fabric_core.wire import Mode

FleetMode = Literal["push", "pull", "mix"]
DocumentKey = tuple[int, int]
SITE_FACT = "site"
"""The host fact that places a simulated agent: `site-k` matches the group's location `site-k`."""
SITE_WEIGHT = 10
IDENTITIES_VERSION = 1


def site_name(site: int) -> str:
    return f"site-{site}"


def key_text(key: DocumentKey) -> str:
    return f"{key[0]}/{key[1]}"


def parse_key(text: str) -> DocumentKey:
    group, location = text.split("/")
    return int(group), int(location)


@dataclass(frozen=True)
class FleetPlan:
    """What to simulate and against which manager."""

    agents: int
    server: str
    admin_key: str | None = None
    tokens: tuple[str, ...] = ()
    mode: FleetMode = "push"
    groups: int = 10
    locations: int = 2
    group_prefix: str = "sim"
    heartbeat_s: int | None = None
    connect_rate: float = 500.0
    start_rate: float | None = None
    """Agents started per second (each sends its first heartbeat at once); default: connect_rate."""
    jitter_s: float = 0.05
    http_connections: int = 16
    enrol_concurrency: int = 8
    identities: Path | None = None
    mqtt_url: str | None = None
    """Overrides the broker address learnt at enrolment (a benchmark's broker may move to another port),
    in every link, also after the manager renewed the credentials; comma-separated: the broker's nodes."""
    seed: int = 0
    ready_timeout_s: float = 600.0
    loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    bare: bool = False
    """A baseline: `BareAgent`s (MQTT connect and subscribe only) instead of agents; needs admin_key."""
    ca_hash: str | None = None
    """The manager CA's hash to pin (`sha256:…`), when the tokens do not carry it."""
    ca_file: Path | None = None
    """The manager's CA certificate(s) (PEM): what the admin API is verified with over https://."""

    def mode_of_group(self, index: int) -> Mode:
        if self.mode == "mix":
            return "push" if index % 2 == 0 else "pull"
        return self.mode

    def group_name(self, index: int) -> str:
        return f"{self.group_prefix}-{index + 1:02d}"

    def site_of(self, agent_index: int) -> int:
        """0 (Default) .. locations-1, spread evenly within each group."""
        width = max(1, len(self.tokens) or self.groups)
        return (agent_index // width) % max(1, self.locations)


class SimIdentity(BaseModel):
    """One simulated agent as kept in the identities file."""

    model_config = ConfigDict(extra="ignore")

    identity: Identity
    site: int = 0


class IdentitiesFile(BaseModel):
    version: int = IDENTITIES_VERSION
    server: str
    agents: list[SimIdentity]


def load_identities(path: Path | None) -> list[SimIdentity]:
    if path is None or not path.exists():
        return []
    stored = IdentitiesFile.model_validate_json(path.read_bytes())
    if stored.version != IDENTITIES_VERSION:
        raise ValueError(f"{path}: identities file version {stored.version}, expected {IDENTITIES_VERSION}")
    return stored.agents


def save_identities(path: Path, server: str, agents: Sequence[SimIdentity]) -> None:
    """Atomically, 0600: the file holds every agent's secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = IdentitiesFile(server=server, agents=list(agents)).model_dump_json().encode()
    write_atomically(path, data, mode=0o600)
