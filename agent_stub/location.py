"""Location awareness: which of its group's locations an agent is in, SEPM style.

Every location of the effective document carries conditions (IP range, DNS server, default gateway,
network type, a host fact, "can reach the manager"), each with a weight. A location's score is the sum of
the weights of its matched conditions; the agent takes the highest-scoring location and falls back to the
`Default` one when nothing scores above 0. Ties keep the location the agent is in (so that it does not
flap between equal candidates), else the first in the document's order.

Everything here is pure: the caller reads the facts (`agent_stub.facts`), knows whether the manager
answered, re-evaluates on its timer (120 s by default) and whenever `facts_signature` changes, and persists
the last `LocationChoice` (a small pydantic model) to pass its `location_id` as `current` after a restart.

Warning, as SEPM users learned: "can reach the manager" used alone sends every agent to the matching
location whenever the manager is down (SEPM's "cannot connect" form; with the positive form of
`fabric_core.wire`, an outage sends every agent out of it, to `Default`). The location then follows the
manager's health, not the agent's place: pair it with a network condition (IP range, DNS server, gateway).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from agent_stub.facts import HostFacts
from fabric_core.patterns import fullmatch
from fabric_core.wire import (
    Condition,
    DnsServerCondition,
    FactCondition,
    GatewayCondition,
    IpRangeCondition,
    LocationEntry,
    ManagerReachableCondition,
    NetworkTypeCondition,
)

log = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CONDITION: TypeAdapter[Condition] = TypeAdapter(Condition)
_CACHE_SIZE = 1024


class LocationChoice(BaseModel):
    """The outcome of an evaluation; JSON-able so the caller can persist it across restarts."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    location_id: int
    name: str
    score: int
    reasons: tuple[str, ...] = ()


# --- one condition ------------------------------------------------------------------------------------


def condition_matches(condition: Condition, facts: HostFacts, *, manager_reachable: bool) -> bool:
    """Whether one parsed condition holds for these facts."""
    match condition:
        case IpRangeCondition(cidr=cidr):
            network = ipaddress.ip_network(cidr, strict=False)
            return any(
                address in network
                for address in _addresses(facts.addresses)
                if address.version == network.version
            )
        case DnsServerCondition(address=address):
            return _parse_address(address) in _addresses(facts.dns_servers)
        case GatewayCondition(address=address):
            return _parse_address(address) in _addresses(facts.gateways)
        case NetworkTypeCondition(value=value):
            return value in facts.network_types
        case FactCondition():
            return _fact_matches(condition, facts)
        case ManagerReachableCondition():
            return manager_reachable == condition.reachable
    return False  # unreachable for a parsed Condition; keeps a newer union member from matching by accident


def _fact_matches(condition: FactCondition, facts: HostFacts) -> bool:
    value = facts.extra.get(condition.name)
    if value is None:
        return False  # a fact the host does not report matches nothing, not even an empty pattern
    if condition.equals is not None:
        return value == condition.equals
    # RE2, as the manager validated it: linear in the value's length, whatever the pattern.
    return condition.matches is not None and fullmatch(condition.matches, value)


def _parse_address(text: str) -> IpAddress | None:
    # Scope ids ("fe80::1%eth0") are dropped: a condition names the router, not the host's interface to it.
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    # An IPv4-mapped IPv6 address (::ffff:10.1.2.3) is the IPv4 host it maps.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _addresses(texts: tuple[str, ...]) -> frozenset[IpAddress]:
    # Cached: thousands of simulated agents re-evaluate the same few fact tuples every period.
    return frozenset(address for text in texts if (address := _parse_address(text)) is not None)


# --- a location ---------------------------------------------------------------------------------------


def parse_condition(raw: dict[str, Any]) -> Condition | None:
    """One raw condition of a document, or None (logged once) if this agent cannot understand it.

    The document is lenient about conditions so that a newer manager can add condition types; an agent
    that does not know one counts it as not matched rather than rejecting the whole document.
    """
    try:
        # orjson: this runs for every condition at every evaluation, after every applied document
        # (the stdlib's json.dumps was a tenth of a push agent's work per change, benchmark 1).
        key: str | bytes = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS, default=str)
    except TypeError:  # orjson.JSONEncodeError: keys that are not strings, nesting too deep
        key = repr(raw)
    return _parse_condition_key(key)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_condition_key(key: str | bytes) -> Condition | None:
    # Cached on the condition's canonical JSON: parsing runs (and a bad condition is logged) once, not at
    # every evaluation.
    try:
        return _CONDITION.validate_json(key)
    except ValidationError as exc:
        shown = key.decode(errors="replace") if isinstance(key, bytes) else key
        log.warning("location condition ignored (counts as not matched): %s: %s", shown, _short(exc))
        return None


def _short(exc: ValidationError) -> str:
    return "; ".join(err["msg"] for err in exc.errors())


def score(location: LocationEntry, facts: HostFacts, *, manager_reachable: bool) -> int:
    """Sum of the weights of the location's matched conditions (unparseable ones count as not matched)."""
    return _evaluate(location, facts, manager_reachable=manager_reachable)[0]


def _evaluate(location: LocationEntry, facts: HostFacts, *, manager_reachable: bool) -> tuple[int, list[str]]:
    total = 0
    reasons: list[str] = []
    for raw in location.conditions:
        condition = parse_condition(raw)
        if condition is not None and condition_matches(condition, facts, manager_reachable=manager_reachable):
            total += condition.weight
            reasons.append(f"{_describe(condition)} (+{condition.weight})")
    return total, reasons


def _describe(condition: Condition) -> str:
    match condition:
        case IpRangeCondition(cidr=cidr):
            return f"ip_range {cidr}"
        case DnsServerCondition(address=address) | GatewayCondition(address=address):
            return f"{condition.type} {address}"
        case NetworkTypeCondition(value=value):
            return f"network_type {value}"
        case FactCondition(name=name, equals=equals, matches=matches):
            return f"fact {name} == {equals!r}" if equals is not None else f"fact {name} ~ {matches!r}"
        case ManagerReachableCondition(reachable=reachable):
            return "manager reachable" if reachable else "manager unreachable"
    return condition.type  # pragma: no cover - every union member is described above


# --- the choice ---------------------------------------------------------------------------------------


def choose_location(
    locations: Sequence[LocationEntry],
    facts: HostFacts,
    *,
    manager_reachable: bool,
    current: int | None = None,
) -> LocationChoice:
    """The location the agent is in.

    Highest score wins; a tie keeps `current` when it is among the tied, else the earliest in `locations`.
    When nothing scores above 0: the Default location (the one flagged `is_default`, else the first).
    Raises ValueError for an empty list (a valid document always has its Default location).
    """
    if not locations:
        raise ValueError("no locations to choose from")
    scored = [
        (location, *_evaluate(location, facts, manager_reachable=manager_reachable)) for location in locations
    ]
    best = max(total for _location, total, _reasons in scored)
    if best <= 0:
        default = next((location for location in locations if location.is_default), locations[0])
        return LocationChoice(
            location_id=default.id, name=default.name, score=0, reasons=("no location matched: Default",)
        )
    tied = [(location, reasons) for location, total, reasons in scored if total == best]
    # The list keeps document order, so tied[0] is the earliest of the tied.
    winner, reasons = next(((loc, why) for loc, why in tied if loc.id == current), tied[0])
    if len(tied) > 1:
        kept = "kept current" if winner.id == current else "first in document order"
        reasons = [*reasons, f"tie between {len(tied)} locations at score {best}: {kept}"]
    return LocationChoice(location_id=winner.id, name=winner.name, score=best, reasons=tuple(reasons))
