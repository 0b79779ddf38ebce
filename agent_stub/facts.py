"""What the agent knows about the network it is on: the host facts that location conditions test.

`read_host_facts()` reads them from the host with the standard library and Linux files (`/proc`, `/sys`,
`/etc`); it never raises and returns whatever it could read. A JSON facts file may override any field
(`load_facts_file` + `merge_facts`) so that tests and the fleet simulator can move an agent between
networks without touching the host. `facts_signature()` is a stable hash: when it changes, the caller
re-evaluates its location at once instead of waiting for the next periodic evaluation.

Every reader takes a `root` so tests can point it at a fake `/proc` + `/sys` + `/etc` tree. Under any root
other than `/` only files are read (no socket lookups, no subprocess): the result is exactly the tree's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import logging
import platform
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from agent_stub.errors import FactsFileError

log = logging.getLogger(__name__)

NetworkType = Literal["ethernet", "wireless", "vpn"]
NETWORK_TYPES: frozenset[str] = frozenset(get_args(NetworkType))

_LIVE_ROOT = Path("/")
_RTF_UP = 0x0001
_RTF_GATEWAY = 0x0002
_VPN_PREFIXES = ("tun", "tap", "wg", "ppp")
_WIRELESS_PREFIXES = ("wl",)
_ETHERNET_PREFIXES = ("en", "eth")
_IP_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """The host's network facts. Immutable; the constructor normalises lists, sets and dicts."""

    addresses: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    network_types: frozenset[NetworkType] = frozenset()
    extra: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        # Callers (and merge_facts) may pass lists and dicts; store immutable copies so a HostFacts held as
        # "the facts of the last evaluation" cannot change under the caller's feet.
        object.__setattr__(self, "addresses", tuple(self.addresses))
        object.__setattr__(self, "dns_servers", tuple(self.dns_servers))
        object.__setattr__(self, "gateways", tuple(self.gateways))
        object.__setattr__(self, "network_types", frozenset(self.network_types))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def __hash__(self) -> int:
        # The generated hash would fail on the mapping proxy.
        return hash(facts_signature(self))

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the shape of a facts file), e.g. for the enrolment request's facts."""
        return {
            "addresses": list(self.addresses),
            "dns_servers": list(self.dns_servers),
            "gateways": list(self.gateways),
            "network_types": sorted(self.network_types),
            "extra": dict(self.extra),
        }


def facts_signature(facts: HostFacts) -> str:
    """A stable hash of the facts: equal for facts that match the same conditions, whatever their order."""
    canonical = {
        "addresses": sorted({_canonical_address(a) for a in facts.addresses}),
        "dns_servers": sorted({_canonical_address(a) for a in facts.dns_servers}),
        "gateways": sorted({_canonical_address(a) for a in facts.gateways}),
        "network_types": sorted(facts.network_types),
        "extra": dict(sorted(facts.extra.items())),
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _canonical_address(text: str) -> str:
    # "::0001" and "::1" are one address; an unparseable string is kept as it is.
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return text


# --- facts files --------------------------------------------------------------------------------------


class _FactsOverride(BaseModel):
    """The schema of a facts file: every field optional; lists for the tuples; `extra` merges by key."""

    model_config = ConfigDict(extra="forbid")

    addresses: list[str] | None = None
    dns_servers: list[str] | None = None
    gateways: list[str] | None = None
    network_types: list[NetworkType] | None = None
    extra: dict[str, str | None] | None = None

    @field_validator("addresses", "dns_servers", "gateways")
    @classmethod
    def _ip_addresses(cls, values: list[str] | None) -> list[str] | None:
        for value in values or ():
            ipaddress.ip_address(value)  # ValueError -> a validation error naming the field
        return values


def load_facts_file(path: Path | str) -> dict[str, Any]:
    """Read and validate a JSON facts file; return its overrides for `merge_facts`.

    Raises `FactsFileError` with the reason when the file is unreadable, not JSON or not a valid facts
    object; the caller logs it and keeps the host facts.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FactsFileError(f"cannot read facts file {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FactsFileError(f"facts file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FactsFileError(f"facts file {path} must hold a JSON object, not {type(data).__name__}")
    _validate_overrides(data, origin=f"facts file {path}")
    return data


def merge_facts(host: HostFacts, overrides: Mapping[str, Any]) -> HostFacts:
    """`host` with the fields named in `overrides` replaced (`extra` merged key by key; null removes one).

    Raises `FactsFileError` if `overrides` does not have the shape of a facts file.
    """
    parsed = _validate_overrides(overrides, origin="facts override")
    changes: dict[str, Any] = {
        name: value
        for name in ("addresses", "dns_servers", "gateways", "network_types")
        if (value := getattr(parsed, name)) is not None
    }
    if parsed.extra is not None:
        extra = {**host.extra, **parsed.extra}
        changes["extra"] = {key: value for key, value in extra.items() if value is not None}
    return dataclasses.replace(host, **changes)


def _validate_overrides(data: Mapping[str, Any], *, origin: str) -> _FactsOverride:
    try:
        # strict: a number where an address or a fact value belongs is a mistake, not something to coerce.
        return _FactsOverride.model_validate(dict(data), strict=True)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise FactsFileError(f"{origin} is invalid: {reasons}") from exc


# --- reading the host ---------------------------------------------------------------------------------


def read_host_facts(root: Path = _LIVE_ROOT) -> HostFacts:
    """The facts of this host, as far as they can be read; never raises.

    Blocking (file reads, a hostname lookup, maybe `ip`): an asyncio caller runs it in a thread.
    """
    live = root == _LIVE_ROOT
    resolv = _resolv_conf(root)
    return HostFacts(
        addresses=read_addresses(root),
        dns_servers=_nameservers(resolv),
        gateways=read_gateways(root),
        network_types=read_network_types(root),
        extra=_extra_facts(root, resolv, live=live),
    )


def read_addresses(root: Path = _LIVE_ROOT) -> tuple[str, ...]:
    """IPv4 and IPv6 addresses of the host's interfaces, minus loopback and IPv6 link-local.

    Loopback and fe80::/10 are on every host, so they never tell one network from another.
    """
    found = [
        *_fib_trie_locals(_read(root / "proc/net/fib_trie")),
        *_if_inet6(_read(root / "proc/net/if_inet6")),
    ]
    if root == _LIVE_ROOT:
        if not found:  # a sandbox may hide /proc/net; `ip` may still see the interfaces
            found.extend(_ip_json_addresses())
        found.extend(_hostname_addresses())
    return _unique(address for address in found if _is_locating(address))


def read_gateways(root: Path = _LIVE_ROOT) -> tuple[str, ...]:
    """Next hops of the default routes, IPv4 (`/proc/net/route`) then IPv6 (`/proc/net/ipv6_route`)."""
    return _unique(
        [
            *_ipv4_gateways(_read(root / "proc/net/route")),
            *_ipv6_gateways(_read(root / "proc/net/ipv6_route")),
        ]
    )


def read_dns_servers(root: Path = _LIVE_ROOT) -> tuple[str, ...]:
    """Nameserver addresses of the resolver configuration."""
    return _nameservers(_resolv_conf(root))


def read_network_types(root: Path = _LIVE_ROOT) -> frozenset[NetworkType]:
    """Kinds of network the host is on, guessed from its interfaces that are not down."""
    net = root / "sys/class/net"
    try:
        interfaces = sorted(net.iterdir())
    except OSError:
        return frozenset()
    kinds: set[NetworkType] = set()
    for interface in interfaces:
        # A NIC without a cable or a Wi-Fi card switched off says nothing about where the host is.
        if _read(interface / "operstate").strip() == "down":
            continue
        kind = _interface_kind(interface)
        if kind is not None:
            kinds.add(kind)
    return frozenset(kinds)


def _interface_kind(interface: Path) -> NetworkType | None:
    name = interface.name
    if name.startswith(_VPN_PREFIXES):
        return "vpn"
    # Wi-Fi drivers expose wireless/ or phy80211 whatever the (possibly renamed) interface is called.
    if (
        name.startswith(_WIRELESS_PREFIXES)
        or (interface / "wireless").exists()
        or (interface / "phy80211").exists()
    ):
        return "wireless"
    if name.startswith(_ETHERNET_PREFIXES):
        return "ethernet"
    return None  # lo, bridges, veth pairs, ifb...: not a network the host is on


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _is_locating(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return not (address.is_loopback or (address.version == 6 and address.is_link_local))


def _fib_trie_locals(text: str) -> list[str]:
    # A leaf line "|-- 192.0.2.2" followed by "/32 host LOCAL" is an address of this host; the other
    # leaves are routes and broadcast addresses.
    found: list[str] = []
    leaf: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            leaf = stripped[3:].strip()
        elif leaf is not None and stripped.startswith("/32 host LOCAL"):
            found.append(leaf)
    return found


def _if_inet6(text: str) -> list[str]:
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.extend(_hex_ipv6(fields[0]))
    return found


def _hex_ipv6(hex32: str) -> list[str]:
    try:
        return [str(ipaddress.IPv6Address(bytes.fromhex(hex32)))]
    except ValueError:
        return []


def _ipv4_gateways(text: str) -> list[str]:
    found: list[str] = []
    for line in text.splitlines()[1:]:  # the first line names the columns
        fields = line.split()
        if len(fields) < 8:
            continue
        _iface, destination, gateway, flags, *_rest = fields
        mask = fields[7]
        try:
            is_default = int(destination, 16) == 0 and int(mask, 16) == 0
            wanted = int(flags, 16) & (_RTF_UP | _RTF_GATEWAY) == _RTF_UP | _RTF_GATEWAY
            # The kernel prints the network-order address as a native integer: pack it back natively.
            address = socket.inet_ntoa(struct.pack("=I", int(gateway, 16)))
        except (ValueError, struct.error):
            continue
        if is_default and wanted:
            found.append(address)
    return found


def _ipv6_gateways(text: str) -> list[str]:
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        destination, prefix, next_hop, flags = fields[0], fields[1], fields[4], fields[8]
        try:
            is_default = int(destination, 16) == 0 and int(prefix, 16) == 0
            via_gateway = int(flags, 16) & _RTF_GATEWAY and int(next_hop, 16) != 0
        except ValueError:
            continue
        if is_default and via_gateway:
            found.extend(_hex_ipv6(next_hop))
    return found


def _resolv_conf(root: Path) -> str:
    text = _read(root / "etc/resolv.conf")
    # systemd-resolved points /etc/resolv.conf at its local stub (127.0.0.53): the servers that say which
    # network the host is on are in its upstream file.
    servers = _nameservers(text)
    if servers and all(ipaddress.ip_address(s.split("%", 1)[0]).is_loopback for s in servers):
        upstream = _read(root / "run/systemd/resolve/resolv.conf")
        if _nameservers(upstream):
            return upstream
    return text


def _nameservers(resolv: str) -> tuple[str, ...]:
    found: list[str] = []
    for line in resolv.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue
            found.append(fields[1])
    return _unique(found)


def _search_domain(resolv: str) -> str | None:
    # resolv(5): the last "domain" or "search" line wins; the first search domain is the local one.
    domain: str | None = None
    for line in resolv.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] in ("domain", "search"):
            domain = fields[1]
    return domain


def _extra_facts(root: Path, resolv: str, *, live: bool) -> dict[str, str]:
    extra = {
        "hostname": _first_line(root / "proc/sys/kernel/hostname") or _first_line(root / "etc/hostname"),
        "os": _first_line(root / "proc/sys/kernel/ostype").lower(),
        "os_id": _os_release_id(root),
        "domain": _search_domain(resolv) or "",
    }
    if live:
        extra["hostname"] = extra["hostname"] or socket.gethostname()
        extra["os"] = extra["os"] or platform.system().lower()
    return {key: value for key, value in extra.items() if value}


def _first_line(path: Path) -> str:
    lines = _read(path).splitlines()
    return lines[0].strip() if lines else ""


def _os_release_id(root: Path) -> str:
    for line in _read(root / "etc/os-release").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ID":
            return value.strip().strip("\"'")
    return ""


def _hostname_addresses() -> list[str]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


def _ip_json_addresses() -> list[str]:
    binary = shutil.which("ip")
    if binary is None:
        return []
    try:
        done = subprocess.run(
            [binary, "-j", "addr"], capture_output=True, timeout=_IP_TIMEOUT_S, check=True, text=True
        )
        interfaces = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    if not isinstance(interfaces, list):
        return []
    return [
        str(info["local"])
        for interface in interfaces
        if isinstance(interface, dict)
        for info in interface.get("addr_info") or ()
        if isinstance(info, dict) and info.get("local")
    ]
