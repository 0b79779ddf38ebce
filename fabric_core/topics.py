"""The MQTT topic scheme. Nothing else in Policycast formats or splits a topic.

{prefix}/v1/config/{group_id}/{location_id}   bridge -> agents of one (group, location), retained
{prefix}/v1/agents/{agent_id}/cmd             manager -> one agent (update now, ...)
{prefix}/v1/agents/{agent_id}/state           agent -> manager, retained, last will says offline
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fabric_core.errors import InvalidIdentifier, InvalidTopic

VERSION = "v1"
DEFAULT_PREFIX = "policycast"
_RESERVED = frozenset("/+#\x00")

AgentChannel = Literal["cmd", "state"]


def check_id(value: str | int, what: str = "id") -> str:
    """An id as it appears in a topic: non-empty, no `/`, `+`, `#` or NUL."""
    text = str(value)
    if not text or any(ch in _RESERVED for ch in text):
        raise InvalidIdentifier(f"{what} {text!r} is empty or holds one of / + # NUL")
    return text


def check_prefix(prefix: str) -> str:
    if not prefix or any(ch in "+#\x00" for ch in prefix) or prefix.startswith("/") or prefix.endswith("/"):
        raise InvalidTopic(f"topic prefix {prefix!r} must be non-empty, hold no wildcard, no edge '/'")
    return prefix


@dataclass(frozen=True, slots=True)
class ConfigTopic:
    prefix: str
    group_id: str
    location_id: str

    def __str__(self) -> str:
        return config_topic(self.prefix, self.group_id, self.location_id)


@dataclass(frozen=True, slots=True)
class AgentTopic:
    prefix: str
    agent_id: str
    channel: AgentChannel

    def __str__(self) -> str:
        return agent_topic(self.prefix, self.agent_id, self.channel)


def config_topic(prefix: str, group_id: str | int, location_id: str | int) -> str:
    group = check_id(group_id, "group id")
    location = check_id(location_id, "location id")
    return f"{check_prefix(prefix)}/{VERSION}/config/{group}/{location}"


def group_config_filter(prefix: str, group_id: str | int) -> str:
    """The subscription filter for every location of one group (used by broker roles)."""
    return f"{check_prefix(prefix)}/{VERSION}/config/{check_id(group_id, 'group id')}/#"


def agent_topic(prefix: str, agent_id: str, channel: AgentChannel) -> str:
    if channel not in ("cmd", "state"):
        raise InvalidTopic(f"unknown agent channel {channel!r}")
    return f"{check_prefix(prefix)}/{VERSION}/agents/{check_id(agent_id, 'agent id')}/{channel}"


def cmd_topic(prefix: str, agent_id: str) -> str:
    return agent_topic(prefix, agent_id, "cmd")


def state_topic(prefix: str, agent_id: str) -> str:
    return agent_topic(prefix, agent_id, "state")


def all_configs_filter(prefix: str) -> str:
    """Every config topic (the bridge's publish permission)."""
    return f"{check_prefix(prefix)}/{VERSION}/config/#"


def all_cmds_filter(prefix: str) -> str:
    """Every agent's cmd topic (the bridge's publish permission)."""
    return f"{check_prefix(prefix)}/{VERSION}/agents/+/cmd"


def all_states_filter(prefix: str) -> str:
    """The subscription filter the bridge uses to ingest every agent's state."""
    return f"{check_prefix(prefix)}/{VERSION}/agents/+/state"


def parse_topic(prefix: str, topic: str) -> ConfigTopic | AgentTopic:
    """Split a concrete topic of the scheme; raise `InvalidTopic` for anything else."""
    head = f"{check_prefix(prefix)}/{VERSION}/"
    if not topic.startswith(head):
        raise InvalidTopic(f"topic {topic!r} is outside {head}")
    parts = topic[len(head) :].split("/")
    try:
        if len(parts) == 3 and parts[0] == "config":
            return ConfigTopic(prefix, check_id(parts[1], "group id"), check_id(parts[2], "location id"))
        if len(parts) == 3 and parts[0] == "agents" and parts[2] in ("cmd", "state"):
            channel: AgentChannel = "cmd" if parts[2] == "cmd" else "state"
            return AgentTopic(prefix, check_id(parts[1], "agent id"), channel)
    except InvalidIdentifier as exc:
        raise InvalidTopic(f"topic {topic!r}: {exc}") from exc
    raise InvalidTopic(f"topic {topic!r} is not a config, cmd or state topic")


def nats_subject(topic_or_filter: str) -> str:
    """The NATS subject of an MQTT topic or filter, as NATS's MQTT maps them: `/` -> `.`, `+` -> `*`,
    `#` -> `>` (which, unlike MQTT's `#`, does not match the parent level itself). Ids hold no `.`."""
    if "." in topic_or_filter:
        raise InvalidTopic(f"topic {topic_or_filter!r} holds a '.', which NATS reads as a level separator")
    levels = topic_or_filter.split("/")
    mapped = {"+": "*", "#": ">"}
    return ".".join(mapped.get(level, level) for level in levels)


def group_config_subjects(prefix: str, group_id: str | int) -> str:
    """The NATS subject of every location's config topic of one group (an agent's read permission)."""
    group = check_id(group_id, "group id")
    return nats_subject(f"{check_prefix(prefix)}/{VERSION}/config/{group}/+")


def all_subjects(prefix: str) -> str:
    """Every NATS subject under the prefix (the bridge's permissions)."""
    return nats_subject(f"{check_prefix(prefix)}/#")
