"""Location evaluation: each condition type, weights, ties, the Default fallback, lenient conditions."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from agent_stub import location as location_module
from agent_stub.facts import HostFacts
from agent_stub.location import (
    LocationChoice,
    choose_location,
    condition_matches,
    parse_condition,
    score,
)
from fabric_core.wire import EffectiveDocument, LocationEntry

OFFICE_FACTS = HostFacts(
    addresses=("10.1.2.3", "2001:db8:1::42"),
    dns_servers=("10.1.0.53", "fe80::53%eth0"),
    gateways=("10.1.1.1", "2001:db8:1::1"),
    network_types=frozenset({"ethernet", "vpn"}),
    extra={"domain": "corp.example", "hostname": "lab-pc-17", "os": "linux"},
)


def cond(raw: dict[str, Any]) -> Any:
    parsed = parse_condition(raw)
    assert parsed is not None, raw
    return parsed


def matches(raw: dict[str, Any], facts: HostFacts = OFFICE_FACTS, *, reachable: bool = True) -> bool:
    return condition_matches(cond(raw), facts, manager_reachable=reachable)


def loc(id_: int, name: str, *conditions: dict[str, Any], default: bool = False) -> LocationEntry:
    return LocationEntry(id=id_, name=name, is_default=default, conditions=list(conditions))


# --- one condition ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"type": "ip_range", "cidr": "10.1.0.0/16"}, True),
        ({"type": "ip_range", "cidr": "10.1.2.3/32"}, True),
        ({"type": "ip_range", "cidr": "10.1.2.77/16"}, True),  # strict=False: host bits are ignored
        ({"type": "ip_range", "cidr": "10.2.0.0/16"}, False),
        ({"type": "ip_range", "cidr": "2001:db8:1::/48"}, True),
        ({"type": "ip_range", "cidr": "2001:db8:2::/48"}, False),
        ({"type": "ip_range", "cidr": "0.0.0.0/0"}, True),
        ({"type": "dns_server", "address": "10.1.0.53"}, True),
        ({"type": "dns_server", "address": "fe80::53"}, True),  # the scope id of the host's side is ignored
        ({"type": "dns_server", "address": "10.1.0.54"}, False),
        ({"type": "gateway", "address": "10.1.1.1"}, True),
        ({"type": "gateway", "address": "2001:db8:1:0:0:0:0:1"}, True),  # compared as addresses, not text
        ({"type": "gateway", "address": "10.1.0.53"}, False),  # a DNS server is not a gateway
        ({"type": "network_type", "value": "ethernet"}, True),
        ({"type": "network_type", "value": "vpn"}, True),
        ({"type": "network_type", "value": "wireless"}, False),
        ({"type": "fact", "name": "domain", "equals": "corp.example"}, True),
        ({"type": "fact", "name": "domain", "equals": "CORP.example"}, False),  # exact string
        ({"type": "fact", "name": "hostname", "matches": r"lab-pc-\d+"}, True),
        ({"type": "fact", "name": "hostname", "matches": "lab"}, False),  # full match, not search
        ({"type": "fact", "name": "hostname", "matches": r"pc-\d+"}, False),
        ({"type": "fact", "name": "site", "equals": ""}, False),  # a missing fact matches nothing
        ({"type": "fact", "name": "site", "matches": ".*"}, False),
    ],
)
def test_condition_matches(raw: dict[str, Any], expected: bool) -> None:
    assert matches(raw) is expected


def test_ipv4_mapped_ipv6_address_counts_as_its_ipv4_host() -> None:
    facts = HostFacts(addresses=("::ffff:10.9.8.7",))
    assert matches({"type": "ip_range", "cidr": "10.9.0.0/16"}, facts)
    assert not matches({"type": "ip_range", "cidr": "::/0"}, HostFacts(addresses=("10.9.8.7",)))


def test_a_host_without_facts_matches_no_network_condition() -> None:
    for raw in (
        {"type": "ip_range", "cidr": "0.0.0.0/0"},
        {"type": "dns_server", "address": "10.1.0.53"},
        {"type": "gateway", "address": "10.1.1.1"},
        {"type": "network_type", "value": "ethernet"},
        {"type": "fact", "name": "domain", "equals": "corp.example"},
    ):
        assert not matches(raw, HostFacts())


def test_unparseable_facts_are_skipped() -> None:
    facts = HostFacts(addresses=("garbage", "10.1.2.3"), gateways=("nope",))
    assert matches({"type": "ip_range", "cidr": "10.1.0.0/16"}, facts)
    assert not matches({"type": "gateway", "address": "10.1.1.1"}, facts)


def test_manager_reachable_is_the_flag() -> None:
    raw = {"type": "manager_reachable"}
    assert matches(raw, HostFacts(), reachable=True)
    assert not matches(raw, OFFICE_FACTS, reachable=False)


# --- scores -------------------------------------------------------------------------------------------


def test_weights_of_matched_conditions_add_up() -> None:
    office = loc(
        2,
        "Office",
        {"type": "ip_range", "cidr": "10.1.0.0/16", "weight": 10},
        {"type": "dns_server", "address": "10.1.0.53", "weight": 5},
        {"type": "network_type", "value": "wireless", "weight": 100},  # not matched
        {"type": "manager_reachable"},  # default weight 1
    )
    assert score(office, OFFICE_FACTS, manager_reachable=True) == 16
    assert score(office, OFFICE_FACTS, manager_reachable=False) == 15
    assert score(office, HostFacts(), manager_reachable=False) == 0
    assert score(loc(1, "Default", default=True), OFFICE_FACTS, manager_reachable=True) == 0


def test_unknown_and_malformed_conditions_count_as_not_matched_and_are_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    office = loc(
        2,
        "Office",
        {"type": "bluetooth_beacon", "uuid": "f00d", "weight": 50},  # from a newer manager
        {"type": "ip_range", "cidr": "not-a-network", "weight": 50},
        {"type": "fact", "name": "domain", "equals": "corp.example", "matches": ".*", "weight": 50},
        {"type": "gateway", "weight": 50},
        {"weight": 50},
        {"type": "ip_range", "cidr": "10.1.0.0/16", "weight": 3},
    )
    location_module._parse_condition_key.cache_clear()  # "once" is per process: start from a clean slate
    with caplog.at_level(logging.WARNING, logger="agent_stub.location"):
        assert score(office, OFFICE_FACTS, manager_reachable=True) == 3
        assert score(office, OFFICE_FACTS, manager_reachable=True) == 3
    ignored = [r for r in caplog.records if "condition ignored" in r.getMessage()]
    assert len(ignored) == 5
    assert any("bluetooth_beacon" in r.getMessage() for r in ignored)


def test_conditions_of_a_parsed_document_are_evaluated() -> None:
    doc = EffectiveDocument.parse(
        {
            "serial": 1,
            "group_id": 1,
            "location_id": 1,
            "issued_at": "2024-05-01T12:00:00+00:00",
            "communication": {},
            "locations": [
                {"id": 1, "name": "Default", "is_default": True, "conditions": []},
                {
                    "id": 2,
                    "name": "Office",
                    "is_default": False,
                    "conditions": [{"type": "ip_range", "cidr": "10.1.0.0/16"}],
                },
            ],
            "policies": {},
        }
    )
    choice = choose_location(doc.locations, OFFICE_FACTS, manager_reachable=True)
    assert (choice.location_id, choice.name, choice.score) == (2, "Office", 1)
    assert choice.reasons == ("ip_range 10.1.0.0/16 (+1)",)


# --- choosing -----------------------------------------------------------------------------------------

DEFAULT = loc(1, "Default", default=True)
OFFICE = loc(
    2,
    "Office",
    {"type": "ip_range", "cidr": "10.1.0.0/16", "weight": 10},
    {"type": "dns_server", "address": "10.1.0.53", "weight": 5},
)
VPN = loc(3, "Remote VPN", {"type": "network_type", "value": "vpn", "weight": 10})
HOME = loc(4, "Home", {"type": "fact", "name": "domain", "equals": "home.example", "weight": 20})
LOCATIONS = [DEFAULT, OFFICE, VPN, HOME]


def test_the_highest_score_wins() -> None:
    choice = choose_location(LOCATIONS, OFFICE_FACTS, manager_reachable=True)
    assert choice == LocationChoice(
        location_id=2,
        name="Office",
        score=15,
        reasons=("ip_range 10.1.0.0/16 (+10)", "dns_server 10.1.0.53 (+5)"),
    )
    home = HostFacts(network_types=frozenset({"vpn"}), extra={"domain": "home.example"})
    assert choose_location(LOCATIONS, home, manager_reachable=True).location_id == 4


def test_nothing_matched_falls_back_to_default_wherever_it_is_listed() -> None:
    locations = [OFFICE, VPN, DEFAULT]
    choice = choose_location(locations, HostFacts(), manager_reachable=True, current=2)
    assert choice == LocationChoice(
        location_id=1, name="Default", score=0, reasons=("no location matched: Default",)
    )


def test_without_a_flagged_default_the_first_location_is_the_fallback() -> None:
    choice = choose_location([VPN, OFFICE], HostFacts(), manager_reachable=False)
    assert (choice.location_id, choice.score) == (3, 0)


def test_a_default_location_with_conditions_competes_like_any_other() -> None:
    default = loc(1, "Default", {"type": "network_type", "value": "ethernet", "weight": 50}, default=True)
    assert choose_location([default, OFFICE], OFFICE_FACTS, manager_reachable=True).location_id == 1


def test_a_tie_goes_to_the_first_in_document_order() -> None:
    facts = HostFacts(addresses=("10.1.2.3",), network_types=frozenset({"vpn"}))  # Office 10, VPN 10
    choice = choose_location(LOCATIONS, facts, manager_reachable=True)
    assert (choice.location_id, choice.score) == (2, 10)
    assert choice.reasons[-1] == "tie between 2 locations at score 10: first in document order"
    assert choose_location([DEFAULT, VPN, OFFICE], facts, manager_reachable=True).location_id == 3


def test_a_tie_keeps_the_current_location() -> None:
    facts = HostFacts(addresses=("10.1.2.3",), network_types=frozenset({"vpn"}))
    choice = choose_location(LOCATIONS, facts, manager_reachable=True, current=3)
    assert (choice.location_id, choice.name, choice.score) == (3, "Remote VPN", 10)
    assert choice.reasons == ("network_type vpn (+10)", "tie between 2 locations at score 10: kept current")


def test_current_is_not_kept_when_it_scores_lower_or_is_gone() -> None:
    assert choose_location(LOCATIONS, OFFICE_FACTS, manager_reachable=True, current=3).location_id == 2
    facts = HostFacts(addresses=("10.1.2.3",), network_types=frozenset({"vpn"}))
    assert choose_location(LOCATIONS, facts, manager_reachable=True, current=99).location_id == 2


def test_manager_reachable_alone_follows_the_managers_health_not_the_place() -> None:
    # The pitfall documented in agent_stub.location: the location flips with the manager's availability.
    managed = loc(5, "Managed", {"type": "manager_reachable", "weight": 50})
    locations = [DEFAULT, OFFICE, managed]
    assert choose_location(locations, OFFICE_FACTS, manager_reachable=True).location_id == 5
    assert choose_location(locations, OFFICE_FACTS, manager_reachable=False).location_id == 2
    assert choose_location(locations, HostFacts(), manager_reachable=False).location_id == 1


def test_no_locations_is_an_error() -> None:
    with pytest.raises(ValueError, match="no locations"):
        choose_location([], OFFICE_FACTS, manager_reachable=True)


def test_a_choice_round_trips_through_json_for_persistence() -> None:
    choice = choose_location(LOCATIONS, OFFICE_FACTS, manager_reachable=True)
    stored = choice.model_dump_json()
    assert LocationChoice.model_validate_json(stored) == choice
    restored = LocationChoice.model_validate_json(stored)
    assert (
        choose_location(LOCATIONS, OFFICE_FACTS, manager_reachable=True, current=restored.location_id)
        == choice
    )


# --- fact patterns run on RE2 ---------------------------------------------------------------------


def test_a_pattern_that_backtracks_in_python_matches_in_linear_time() -> None:
    facts = HostFacts(extra={"hostname": "a" * 100_000 + "b"})
    started = time.perf_counter()
    assert not matches({"type": "fact", "name": "hostname", "matches": "(a+)+$"}, facts)
    assert matches({"type": "fact", "name": "hostname", "matches": "(a+)+b"}, facts)
    assert time.perf_counter() - started < 0.5  # Python's re: about half a second at 24 characters


def test_a_pattern_re2_refuses_counts_as_not_matched(caplog: pytest.LogCaptureFixture) -> None:
    """A document from a manager that did not check (or an older one): the agent never runs it."""
    raw = {"type": "fact", "name": "hostname", "matches": r"(lab)-pc-\1"}
    with caplog.at_level(logging.WARNING):
        assert parse_condition(raw) is None
    assert "RE2" in caplog.text
    assert score(loc(1, "Lab", raw), OFFICE_FACTS, manager_reachable=True) == 0
