"""The MQTT topic scheme: builders, parser and subscription filters."""

from __future__ import annotations

import pytest

from fabric_core.errors import ContractError, InvalidIdentifier, InvalidTopic
from fabric_core.topics import (
    DEFAULT_PREFIX,
    AgentTopic,
    ConfigTopic,
    agent_topic,
    all_states_filter,
    check_id,
    cmd_topic,
    config_topic,
    group_config_filter,
    parse_topic,
    state_topic,
)

PREFIXES = [DEFAULT_PREFIX, "acme", "acme/prod/policycast", "pc-2.test_x"]
BAD_IDS = ["", "a/b", "/", "a+", "+", "#", "x#y", "nul\x00", "\x00", "a/+/#"]
BAD_PREFIXES = ["", "/policycast", "policycast/", "/", "pc+", "+", "pc/#", "#", "pc\x00"]


def test_default_prefix_is_policycast() -> None:
    assert DEFAULT_PREFIX == "policycast"


def test_formats_with_the_default_prefix() -> None:
    assert config_topic(DEFAULT_PREFIX, 3, 7) == "policycast/v1/config/3/7"
    assert cmd_topic(DEFAULT_PREFIX, "agent-1") == "policycast/v1/agents/agent-1/cmd"
    assert state_topic(DEFAULT_PREFIX, "agent-1") == "policycast/v1/agents/agent-1/state"
    assert group_config_filter(DEFAULT_PREFIX, 3) == "policycast/v1/config/3/#"
    assert all_states_filter(DEFAULT_PREFIX) == "policycast/v1/agents/+/state"


def test_formats_with_a_custom_prefix() -> None:
    prefix = "acme/prod"
    assert config_topic(prefix, "g", "l") == "acme/prod/v1/config/g/l"
    assert cmd_topic(prefix, "a") == "acme/prod/v1/agents/a/cmd"
    assert state_topic(prefix, "a") == "acme/prod/v1/agents/a/state"
    assert group_config_filter(prefix, "g") == "acme/prod/v1/config/g/#"
    assert all_states_filter(prefix) == "acme/prod/v1/agents/+/state"


@pytest.mark.parametrize(("channel", "builder"), [("cmd", cmd_topic), ("state", state_topic)])
def test_agent_topic_matches_cmd_and_state(channel: str, builder: object) -> None:
    assert agent_topic("p", "a", channel) == builder("p", "a")  # type: ignore[arg-type, operator]


@pytest.mark.parametrize("channel", ["", "CMD", "status", "state/x", "+"])
def test_agent_topic_rejects_unknown_channels(channel: str) -> None:
    with pytest.raises(InvalidTopic):
        agent_topic(DEFAULT_PREFIX, "a", channel)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("group", "location"), [(1, 2), ("12", "34"), ("g-1", "loc.2"), (0, 0)])
def test_parse_config_topic_round_trips(prefix: str, group: str | int, location: str | int) -> None:
    topic = config_topic(prefix, group, location)
    parsed = parse_topic(prefix, topic)
    assert parsed == ConfigTopic(prefix, str(group), str(location))
    assert str(parsed) == topic


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("agent_id", ["a", "agent-1", "0b5e-uuid-like", "x.y_z", "42"])
@pytest.mark.parametrize("channel", ["cmd", "state"])
def test_parse_agent_topic_round_trips(prefix: str, agent_id: str, channel: str) -> None:
    topic = agent_topic(prefix, agent_id, channel)  # type: ignore[arg-type]
    parsed = parse_topic(prefix, topic)
    assert parsed == AgentTopic(prefix, agent_id, channel)  # type: ignore[arg-type]
    assert str(parsed) == topic


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_invalid_identifiers_in_every_builder(bad: str) -> None:
    with pytest.raises(InvalidIdentifier):
        check_id(bad)
    with pytest.raises(InvalidIdentifier):
        config_topic(DEFAULT_PREFIX, bad, 1)
    with pytest.raises(InvalidIdentifier):
        config_topic(DEFAULT_PREFIX, 1, bad)
    with pytest.raises(InvalidIdentifier):
        cmd_topic(DEFAULT_PREFIX, bad)
    with pytest.raises(InvalidIdentifier):
        state_topic(DEFAULT_PREFIX, bad)
    with pytest.raises(InvalidIdentifier):
        group_config_filter(DEFAULT_PREFIX, bad)


@pytest.mark.parametrize(("value", "expected"), [(5, "5"), ("abc", "abc"), ("a b", "a b"), ("é", "é")])
def test_check_id_returns_the_text(value: str | int, expected: str) -> None:
    assert check_id(value) == expected


def test_identifier_and_topic_errors_are_contract_errors() -> None:
    assert issubclass(InvalidIdentifier, ContractError)
    assert issubclass(InvalidTopic, ContractError)
    assert issubclass(InvalidTopic, ValueError)


@pytest.mark.parametrize("prefix", BAD_PREFIXES)
def test_bad_prefixes_are_invalid_topics(prefix: str) -> None:
    for build in (
        lambda: config_topic(prefix, 1, 2),
        lambda: cmd_topic(prefix, "a"),
        lambda: state_topic(prefix, "a"),
        lambda: group_config_filter(prefix, 1),
        lambda: all_states_filter(prefix),
        lambda: parse_topic(prefix, "policycast/v1/config/1/2"),
    ):
        with pytest.raises(InvalidTopic):
            build()


@pytest.mark.parametrize(
    "topic",
    [
        # outside the prefix
        "other/v1/config/1/2",
        "policycastx/v1/config/1/2",
        "acme/policycast/v1/config/1/2",
        "/policycast/v1/config/1/2",
        "",
        "policycast",
        "policycast/",
        # wrong version
        "policycast/v2/config/1/2",
        "policycast/V1/config/1/2",
        "policycast/config/1/2",
        "policycast/v1",
        "policycast/v1/",
        # wrong shape
        "policycast/v1/config/1",
        "policycast/v1/config/1/2/3",
        "policycast/v1/config/1/2/",
        "policycast/v1/config//2",
        "policycast/v1/config/1/",
        "policycast/v1/config",
        "policycast/v1/configs/1/2",
        "policycast/v1/agents/a",
        "policycast/v1/agents/a/cmd/x",
        "policycast/v1/agents//cmd",
        "policycast/v1/agents/a/status",
        "policycast/v1/agents/a/",
        "policycast/v1/agent/a/cmd",
        "policycast/v1/other/a/cmd",
        # wildcards
        "policycast/v1/config/+/2",
        "policycast/v1/config/1/+",
        "policycast/v1/config/1/#",
        "policycast/v1/config/#",
        "policycast/v1/agents/+/state",
        "policycast/v1/agents/#/cmd",
        "policycast/v1/agents/a+b/cmd",
        "policycast/v1/#",
        "policycast/#",
        "#",
    ],
)
def test_topics_outside_the_scheme_are_invalid(topic: str) -> None:
    with pytest.raises(InvalidTopic):
        parse_topic(DEFAULT_PREFIX, topic)


def test_a_topic_of_another_prefix_is_invalid() -> None:
    with pytest.raises(InvalidTopic):
        parse_topic("acme", config_topic(DEFAULT_PREFIX, 1, 2))
    with pytest.raises(InvalidTopic):
        parse_topic(DEFAULT_PREFIX, config_topic("acme", 1, 2))


@pytest.mark.parametrize(
    "topic",
    ["policycast/v1/config/1/\x00", "policycast/v1/config/g\x00/2", "policycast/v1/agents/a\x00/cmd"],
)
def test_parse_topic_rejects_nul_in_ids(topic: str) -> None:
    with pytest.raises(InvalidTopic):
        parse_topic(DEFAULT_PREFIX, topic)


def test_group_config_filter_covers_every_location_of_the_group_only() -> None:
    topic_filter = group_config_filter(DEFAULT_PREFIX, 3)
    stem = topic_filter.removesuffix("#")
    assert config_topic(DEFAULT_PREFIX, 3, 7).startswith(stem)
    assert config_topic(DEFAULT_PREFIX, 3, 8).startswith(stem)
    assert not config_topic(DEFAULT_PREFIX, 33, 7).startswith(stem)


def test_all_states_filter_matches_state_topics_only() -> None:
    head, tail = all_states_filter(DEFAULT_PREFIX).split("+")
    state = state_topic(DEFAULT_PREFIX, "agent-9")
    cmd = cmd_topic(DEFAULT_PREFIX, "agent-9")
    assert state.startswith(head)
    assert state.endswith(tail)
    assert not cmd.endswith(tail)


def test_topic_dataclasses_are_frozen() -> None:
    topic = ConfigTopic(DEFAULT_PREFIX, "1", "2")
    with pytest.raises(AttributeError):
        topic.group_id = "3"  # type: ignore[misc]
