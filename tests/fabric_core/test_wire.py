"""Wire models: requests forbid unknown fields, documents are lenient, conditions validate."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from fabric_core.errors import InvalidDocument
from fabric_core.signing import SigningKey, open_envelope
from fabric_core.wire import (
    MAX_LOG_ENTRIES,
    AgentStateReport,
    Condition,
    EffectiveDocument,
    EnrollRequest,
    FactCondition,
    HeartbeatRequest,
    HeartbeatResponse,
    IpRangeCondition,
    LogBatch,
    ManagerReachableCondition,
    NetworkTypeCondition,
    heartbeat_response_bytes,
)

CONDITIONS = TypeAdapter(list[Condition])

DOC: dict[str, Any] = {
    "serial": 42,
    "group_id": 3,
    "location_id": 7,
    "issued_at": "2024-05-01T12:00:00Z",
    "communication": {"mode": "pull", "heartbeat_s": 60, "download_enabled": False, "randomize_s": 5},
    "locations": [
        {"id": 7, "name": "Default", "is_default": True, "conditions": []},
        {
            "id": 8,
            "name": "Office",
            "is_default": False,
            "conditions": [{"type": "ip_range", "cidr": "10.0.0.0/8"}],
        },
    ],
    "policies": {
        "firewall": {
            "id": 1,
            "name": "fw",
            "version": 2,
            "source_group_id": 1,
            "scope": "group",
            "body": {"rules": []},
        }
    },
    "content": {"av": {"revision": 5, "manifest_sha256": "ab" * 32}},
}


def _entry(**overrides: Any) -> dict[str, Any]:
    return {"ts": "2024-05-01T12:00:00Z", "message": "hello", **overrides}


# --- HeartbeatRequest --------------------------------------------------------------------------------


def test_heartbeat_request_minimal_and_defaults() -> None:
    request = HeartbeatRequest.model_validate({"serial": 0, "mode": "push"})
    assert request.serial == 0
    assert request.location_id is None
    assert request.status is None  # absent: unchanged since the last acknowledged heartbeat
    assert request.logs is None


@pytest.mark.parametrize(("status", "expected"), [(None, None), ({}, {}), ({"a": [1]}, {"a": [1]})])
def test_heartbeat_status_is_optional_and_null_means_absent(status: Any, expected: Any) -> None:
    request = HeartbeatRequest.model_validate({"serial": 0, "mode": "push", "status": status})
    assert request.status == expected
    # the agent's encoding (exclude_none) leaves an absent status out of the body altogether
    assert ("status" in request.model_dump(exclude_none=True)) is (expected is not None)


def test_heartbeat_schema_documents_status_as_optional() -> None:
    schema = HeartbeatRequest.model_json_schema()
    assert "status" not in schema["required"]
    assert "unchanged" in schema["properties"]["status"]["description"]


def test_heartbeat_request_full() -> None:
    request = HeartbeatRequest.model_validate_json(
        orjson.dumps(
            {
                "serial": 12,
                "location_id": 7,
                "mode": "pull",
                "status": {"cpu": 3},
                "logs": {"batch_id": "b-1", "entries": [_entry(level="security", data={"k": 1})]},
            }
        )
    )
    assert request.serial == 12
    assert request.location_id == 7
    assert request.mode == "pull"
    assert request.logs is not None
    assert request.logs.entries[0].level == "security"
    assert request.logs.entries[0].category == "agent"


@pytest.mark.parametrize(
    "body",
    [
        {"serial": 0, "mode": "push", "extra": 1},
        {"serial": 0, "mode": "push", "serail": 1},
        {"serial": 0, "mode": "push", "logs": {"batch_id": "b", "entries": [], "extra": 1}},
        {"serial": 0, "mode": "push", "logs": {"batch_id": "b", "entries": [_entry(extra=1)]}},
    ],
)
def test_heartbeat_request_forbids_unknown_fields(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="extra_forbidden"):
        HeartbeatRequest.model_validate(body)


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "push"},
        {"serial": 0},
        {"serial": "abc", "mode": "push"},
        {"serial": 1.5, "mode": "push"},
        {"serial": None, "mode": "push"},
        {"serial": [1], "mode": "push"},
        {"serial": 0, "mode": "PUSH"},
        {"serial": 0, "mode": "poll"},
        {"serial": 0, "mode": None},
        {"serial": 0, "mode": "push", "location_id": "default"},
        {"serial": 0, "mode": "push", "status": "ok"},
        {"serial": 0, "mode": "push", "status": [1]},
        {"serial": 0, "mode": "push", "logs": []},
        {"serial": 0, "mode": "push", "logs": {"batch_id": "b", "entries": "x"}},
        {"serial": 0, "mode": "push", "logs": {"batch_id": "b", "entries": [_entry(level="fatal")]}},
        {"serial": 0, "mode": "push", "logs": {"batch_id": "b", "entries": [_entry(ts="yesterday")]}},
        {"serial": 0, "mode": "push", "logs": {"batch_id": "b", "entries": [_entry(message="x" * 4097)]}},
        {"serial": 0, "mode": "push", "logs": {"batch_id": "b", "entries": [_entry(category="")]}},
        {"serial": 0, "mode": "push", "logs": {"batch_id": "b", "entries": [{"message": "no ts"}]}},
    ],
)
def test_heartbeat_request_rejects_missing_fields_and_wrong_types(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HeartbeatRequest.model_validate(body)
    with pytest.raises(ValidationError):
        HeartbeatRequest.model_validate_json(orjson.dumps(body))


@pytest.mark.parametrize("serial", [-1, -100])
def test_heartbeat_serial_is_not_negative(serial: int) -> None:
    with pytest.raises(ValidationError):
        HeartbeatRequest.model_validate({"serial": serial, "mode": "push"})


@pytest.mark.parametrize("serial", [0, 1, 2**53])
def test_heartbeat_serial_from_zero(serial: int) -> None:
    assert HeartbeatRequest.model_validate({"serial": serial, "mode": "pull"}).serial == serial


# --- LogBatch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_id", ["a", "B-1", "2024-05-01T12:00:00.123", "x_y.z:9", "a" * 64])
def test_batch_id_accepts_the_pattern(batch_id: str) -> None:
    assert LogBatch.model_validate({"batch_id": batch_id, "entries": []}).batch_id == batch_id


@pytest.mark.parametrize(
    "batch_id",
    ["", "a" * 65, "a b", "a/b", "a\n", "\nA", "é", "a+b", "a#", "a,b", "a;b", 7, None],
)
def test_batch_id_rejects_outside_the_pattern(batch_id: object) -> None:
    with pytest.raises(ValidationError):
        LogBatch.model_validate({"batch_id": batch_id, "entries": []})


def test_max_log_entries_is_accepted_one_more_is_not() -> None:
    entries = [_entry(message=str(i)) for i in range(MAX_LOG_ENTRIES)]
    assert len(LogBatch.model_validate({"batch_id": "b", "entries": entries}).entries) == MAX_LOG_ENTRIES
    with pytest.raises(ValidationError):
        LogBatch.model_validate({"batch_id": "b", "entries": [*entries, _entry()]})


def test_max_log_entries_is_a_thousand() -> None:
    assert MAX_LOG_ENTRIES == 1000


# --- EffectiveDocument -------------------------------------------------------------------------------


def test_effective_document_parses_a_full_document() -> None:
    doc = EffectiveDocument.parse(copy.deepcopy(DOC))
    assert doc.serial == 42
    assert (doc.group_id, doc.location_id) == (3, 7)
    assert doc.issued_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert doc.communication.mode == "pull"
    assert doc.communication.heartbeat_s == 60
    assert [location.id for location in doc.locations] == [7, 8]
    assert doc.locations[1].conditions == [{"type": "ip_range", "cidr": "10.0.0.0/8"}]
    assert doc.policies["firewall"].scope == "group"
    assert doc.content["av"].revision == 5


def test_content_defaults_to_empty() -> None:
    doc = copy.deepcopy(DOC)
    del doc["content"]
    assert EffectiveDocument.parse(doc).content == {}


def _drop(*path: str) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return mutate


def _set(value: Any, *path: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_drop("serial"), id="no-serial"),
        pytest.param(_drop("group_id"), id="no-group"),
        pytest.param(_drop("location_id"), id="no-location"),
        pytest.param(_drop("issued_at"), id="no-issued-at"),
        pytest.param(_drop("communication"), id="no-communication"),
        pytest.param(_drop("locations"), id="no-locations"),
        pytest.param(_drop("policies"), id="no-policies"),
        pytest.param(_set(0, "serial"), id="serial-zero"),
        pytest.param(_set(-3, "serial"), id="serial-negative"),
        pytest.param(_set("x", "serial"), id="serial-text"),
        pytest.param(_set("not a date", "issued_at"), id="bad-date"),
        pytest.param(_set("smoke", "communication", "mode"), id="bad-mode"),
        pytest.param(_set(0, "communication", "heartbeat_s"), id="heartbeat-zero"),
        pytest.param(_set(86_401, "communication", "heartbeat_s"), id="heartbeat-too-long"),
        pytest.param(_set(-1, "communication", "randomize_s"), id="randomize-negative"),
        pytest.param(_set({}, "locations"), id="locations-object"),
        pytest.param(_set([{"id": 1}], "locations"), id="location-incomplete"),
        pytest.param(_set([], "policies"), id="policies-list"),
        pytest.param(_set("site", "policies", "firewall", "scope"), id="bad-scope"),
        pytest.param(_drop("policies", "firewall", "body"), id="policy-no-body"),
        pytest.param(_set([], "policies", "firewall", "body"), id="policy-body-list"),
        pytest.param(_drop("content", "av", "manifest_sha256"), id="content-incomplete"),
    ],
)
def test_malformed_documents_are_invalid_documents(mutate: Any) -> None:
    doc = copy.deepcopy(DOC)
    mutate(doc)
    with pytest.raises(InvalidDocument):
        EffectiveDocument.parse(doc)


@pytest.mark.parametrize("doc", [None, [], "doc", 42, {}])
def test_non_documents_are_invalid_documents(doc: Any) -> None:
    with pytest.raises(InvalidDocument):
        EffectiveDocument.parse(doc)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_set("future", "new_top_level_field"), id="top-level"),
        pytest.param(_set({"a": 1}, "new_section"), id="top-level-object"),
        pytest.param(_set(True, "locations", 0, "new_field"), id="location"),
        pytest.param(_set("x", "policies", "firewall", "new_field"), id="policy"),
        pytest.param(_set(1, "content", "av", "new_field"), id="content"),
        pytest.param(_set([{"type": "future_condition"}], "locations", 1, "conditions"), id="condition"),
    ],
)
def test_unknown_extra_fields_are_accepted(mutate: Any) -> None:
    doc = copy.deepcopy(DOC)
    mutate(doc)
    assert EffectiveDocument.parse(doc).serial == 42


def test_unknown_communication_field_is_accepted() -> None:
    doc = copy.deepcopy(DOC)
    doc["communication"]["new_field"] = 1
    assert EffectiveDocument.parse(doc).communication.heartbeat_s == 60


# --- location conditions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "cls"),
    [
        ({"type": "ip_range", "cidr": "10.1.0.0/16"}, IpRangeCondition),
        ({"type": "ip_range", "cidr": "10.1.2.3/16"}, IpRangeCondition),
        ({"type": "ip_range", "cidr": "192.168.1.5"}, IpRangeCondition),
        ({"type": "ip_range", "cidr": "2001:db8::/32"}, IpRangeCondition),
        ({"type": "fact", "name": "os", "equals": "linux"}, FactCondition),
        ({"type": "fact", "name": "os", "equals": ""}, FactCondition),
        ({"type": "fact", "name": "host", "matches": r"^web-\d+$"}, FactCondition),
        ({"type": "network_type", "value": "ethernet"}, NetworkTypeCondition),
        ({"type": "network_type", "value": "wireless"}, NetworkTypeCondition),
        ({"type": "network_type", "value": "vpn"}, NetworkTypeCondition),
        ({"type": "manager_reachable"}, ManagerReachableCondition),
        ({"type": "manager_reachable", "weight": 1000}, ManagerReachableCondition),
        ({"type": "dns_server", "address": "10.0.0.53"}, object),
        ({"type": "gateway", "address": "fe80::1"}, object),
    ],
)
def test_valid_conditions(raw: dict[str, Any], cls: type) -> None:
    [condition] = CONDITIONS.validate_python([raw])
    assert isinstance(condition, cls)
    assert condition.type == raw["type"]
    assert condition.weight == raw.get("weight", 1)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"type": "ip_range", "cidr": "10.0.0.0/33"}, id="cidr-prefix-too-long"),
        pytest.param({"type": "ip_range", "cidr": "300.0.0.0/8"}, id="cidr-bad-octet"),
        pytest.param({"type": "ip_range", "cidr": "office"}, id="cidr-name"),
        pytest.param({"type": "ip_range", "cidr": ""}, id="cidr-empty"),
        pytest.param({"type": "ip_range"}, id="cidr-missing"),
        pytest.param({"type": "ip_range", "cidr": "10.0.0.0/8", "extra": 1}, id="extra-field"),
        pytest.param({"type": "dns_server", "address": "10.0.0.0/8"}, id="dns-cidr"),
        pytest.param({"type": "gateway", "address": "router"}, id="gateway-name"),
        pytest.param({"type": "fact", "name": "os"}, id="fact-neither"),
        pytest.param({"type": "fact", "name": "os", "equals": "a", "matches": "a"}, id="fact-both"),
        pytest.param({"type": "fact", "name": "", "equals": "a"}, id="fact-empty-name"),
        pytest.param({"type": "network_type", "value": "wifi"}, id="network-wifi"),
        pytest.param({"type": "network_type", "value": "Ethernet"}, id="network-case"),
        pytest.param({"type": "network_type"}, id="network-missing"),
        pytest.param({"type": "manager_reachable", "weight": 0}, id="weight-zero"),
        pytest.param({"type": "manager_reachable", "weight": -1}, id="weight-negative"),
        pytest.param({"type": "manager_reachable", "weight": 1001}, id="weight-too-high"),
        pytest.param({"type": "manager_reachable", "weight": "heavy"}, id="weight-text"),
        pytest.param({"type": "moon_phase"}, id="unknown-type"),
        pytest.param({"cidr": "10.0.0.0/8"}, id="no-type"),
    ],
)
def test_invalid_conditions_are_validation_errors(raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CONDITIONS.validate_python([raw])


@pytest.mark.parametrize("weight", [1, 500, 1000])
def test_weight_bounds_inclusive(weight: int) -> None:
    [condition] = CONDITIONS.validate_python([{"type": "network_type", "value": "vpn", "weight": weight}])
    assert condition.weight == weight


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x", "a{2,1}"])
def test_fact_condition_with_invalid_regex_is_a_validation_error(pattern: str) -> None:
    with pytest.raises(ValidationError):
        CONDITIONS.validate_python([{"type": "fact", "name": "host", "matches": pattern}])


def test_conditions_round_trip_through_json() -> None:
    raw = [
        {"type": "ip_range", "cidr": "10.0.0.0/8", "weight": 3},
        {"type": "fact", "name": "os", "equals": "linux", "matches": None, "weight": 1},
        {"type": "network_type", "value": "vpn", "weight": 2},
    ]
    parsed = CONDITIONS.validate_json(orjson.dumps(raw))
    assert CONDITIONS.dump_python(parsed) == raw


# --- heartbeat response bytes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changed", "serial", "next_heartbeat_s"),
    [(False, 0, 300), (False, 17, 1), (True, 42, 86_400), (True, 2**53, 60)],
)
def test_heartbeat_response_bytes_without_envelope(changed: bool, serial: int, next_heartbeat_s: int) -> None:
    data = heartbeat_response_bytes(
        changed=changed, serial=serial, next_heartbeat_s=next_heartbeat_s, envelope=None
    )
    expected = HeartbeatResponse(changed=changed, serial=serial, next_heartbeat_s=next_heartbeat_s)
    assert orjson.loads(data) == expected.model_dump(exclude_none=True)
    assert "config" not in orjson.loads(data)
    assert HeartbeatResponse.model_validate_json(data) == expected


@pytest.mark.parametrize("doc", [DOC, {"serial": 1}, {"note": '日本語 "quoted" \\ back'}])
@pytest.mark.parametrize("changed", [True, False])
def test_heartbeat_response_bytes_with_envelope(doc: dict[str, Any], changed: bool) -> None:
    key = SigningKey.generate()
    envelope = key.sign_envelope(doc)
    data = heartbeat_response_bytes(changed=changed, serial=42, next_heartbeat_s=300, envelope=envelope)
    expected = HeartbeatResponse.model_validate(
        {"changed": changed, "serial": 42, "next_heartbeat_s": 300, "config": orjson.loads(envelope)}
    )
    parsed = orjson.loads(data)
    assert parsed == expected.model_dump(exclude_none=True)
    assert HeartbeatResponse.model_validate_json(data) == expected
    assert open_envelope(parsed["config"], key.verify_key) == doc
    assert open_envelope(orjson.dumps(parsed["config"]), key.verify_key) == doc
    assert envelope in data


# --- request models are strict, bounded, and take only storable text ----------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"serial": "1", "mode": "pull"},
        {"serial": True, "mode": "pull"},
        {"serial": 1.0, "mode": "pull"},
        {"serial": 0, "mode": "pull", "location_id": "3"},
        {"serial": 0, "mode": "pull", "location_id": False},
        {"serial": 0, "mode": "pull", "location_id": 2**63},
        {"serial": 0, "mode": "pull", "location_id": -(2**63) - 1},
    ],
)
def test_heartbeat_request_types_are_strict_and_bounded(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HeartbeatRequest.model_validate(body)


def test_heartbeat_location_may_be_any_64_bit_integer() -> None:
    """An unknown location is not an error (the agent gets its Default): only what BIGINT cannot hold is."""
    for location_id in (-(2**63), -1, 0, 2**63 - 1):
        assert HeartbeatRequest.model_validate({"serial": 0, "mode": "pull", "location_id": location_id})


def test_log_entries_take_iso_timestamps_from_json_and_python() -> None:
    batch = LogBatch.model_validate_json(
        b'{"batch_id": "b", "entries": [{"ts": "2024-05-01T08:00:00Z", "message": "m"}]}'
    )
    assert batch.entries[0].ts == datetime(2024, 5, 1, 8, tzinfo=UTC)
    parsed = LogBatch.model_validate(
        {"batch_id": "b", "entries": [{"ts": "2024-05-01T10:00:00+02:00", "message": "m"}]}
    )
    assert parsed.entries[0].ts == datetime(2024, 5, 1, 8, tzinfo=UTC)


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01"])
def test_a_log_moment_without_a_utc_equivalent_is_refused(ts: str) -> None:
    with pytest.raises(ValidationError, match="outside the years"):
        LogBatch.model_validate({"batch_id": "b", "entries": [{"ts": ts, "message": "m"}]})


@pytest.mark.parametrize("field", ["message", "category"])
def test_log_text_refuses_nul(field: str) -> None:
    entry = {"ts": "2024-05-01T08:00:00Z", "message": "m", field: "a\x00b"}
    with pytest.raises(ValidationError, match="NUL"):
        LogBatch.model_validate({"batch_id": "b", "entries": [entry]})


def test_enrolment_hostnames_are_nfc_without_control_characters() -> None:
    assert EnrollRequest.model_validate({"token": "t", "hostname": "Cafe\u0301"}).hostname == "Caf\u00e9"
    for hostname in ("a\nb", "a\x00b", "\x1b[1m"):
        with pytest.raises(ValidationError, match="control characters"):
            EnrollRequest.model_validate({"token": "t", "hostname": hostname})
    with pytest.raises(ValidationError):
        EnrollRequest.model_validate({"token": "t", "hostname": 5})


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?=x)", "(?<=x)y"])
def test_fact_patterns_are_re2(pattern: str) -> None:
    with pytest.raises(ValidationError, match="RE2"):
        CONDITIONS.validate_python([{"type": "fact", "name": "host", "matches": pattern}])
    assert CONDITIONS.validate_python([{"type": "fact", "name": "host", "matches": "(a+)+$"}])


@pytest.mark.parametrize(
    "report",
    [
        {"agent_id": "a", "online": True, "serial": 2**63},
        {"agent_id": "a", "online": True, "location_id": 2**31},
        {"agent_id": "a", "online": True, "group_id": 2**63},
    ],
)
def test_state_reports_are_bounded_to_the_columns_they_are_stored_in(report: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AgentStateReport.model_validate(report)
