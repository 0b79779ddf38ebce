"""Host facts: the reader on this machine and on fake /proc + /sys + /etc trees, facts files, signatures."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent_stub.errors import FactsFileError
from agent_stub.facts import (
    HostFacts,
    facts_signature,
    load_facts_file,
    merge_facts,
    read_dns_servers,
    read_host_facts,
    read_network_types,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 10.1.0.0/16 2 0 2
        |-- 10.1.0.0
           /16 link UNICAST
        |-- 10.1.2.3
           /32 host LOCAL
        |-- 10.1.255.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.1.0.0/16 2 0 2
        |-- 10.1.2.3
           /32 host LOCAL
"""

IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000000000000000000000042 02 40 00 00     eth0
fe800000000000000000000000000001 02 40 20 80     eth0
"""

ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101010A\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0000010A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""

IPV6_ROUTE = (
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "20010db8000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n"
    "20010db8000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    "00000000000000000000000000000001 80 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo\n"
)


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def add_interface(root: Path, name: str, *, operstate: str = "up", wireless: bool = False) -> None:
    write(root, f"sys/class/net/{name}/operstate", operstate + "\n")
    if wireless:
        (root / f"sys/class/net/{name}/wireless").mkdir()


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A host on 10.1.0.0/16 and 2001:db8::/64, wired, with a VPN tunnel and a Wi-Fi card switched off."""
    write(tmp_path, "proc/net/fib_trie", FIB_TRIE)
    write(tmp_path, "proc/net/if_inet6", IF_INET6)
    write(tmp_path, "proc/net/route", ROUTE)
    write(tmp_path, "proc/net/ipv6_route", IPV6_ROUTE)
    write(
        tmp_path, "etc/resolv.conf", "# generated\nsearch corp.example other.example\nnameserver 10.1.0.53\n"
    )
    write(tmp_path, "proc/sys/kernel/hostname", "laptop-17\n")
    write(tmp_path, "proc/sys/kernel/ostype", "Linux\n")
    write(tmp_path, "etc/os-release", 'NAME="Debian GNU/Linux"\nID=debian\n')
    add_interface(tmp_path, "lo", operstate="unknown")
    add_interface(tmp_path, "enp0s31f6")
    add_interface(tmp_path, "tun0", operstate="unknown")
    add_interface(tmp_path, "wlp2s0", operstate="down", wireless=True)
    add_interface(tmp_path, "docker0")
    return tmp_path


# --- the reader ---------------------------------------------------------------------------------------


def _kernel_addresses() -> tuple[set[IPAddress], set[IPAddress]]:
    """The host's addresses as the kernel tells them over netlink (`ip -j addr`), not from the /proc files
    the reader parses; without loopback and IPv6 link-local: (those of interfaces that are up, all)."""
    ip = shutil.which("ip")
    if ip is None:
        pytest.fail("this test compares the reader with `ip -j addr`: install iproute2", pytrace=False)
    done = subprocess.run([ip, "-j", "addr"], capture_output=True, text=True, check=True, timeout=10)
    up: set[IPAddress] = set()
    every: set[IPAddress] = set()
    for interface in json.loads(done.stdout):
        for info in interface.get("addr_info") or ():
            address = ipaddress.ip_address(info["local"])
            if address.is_loopback or (address.version == 6 and address.is_link_local):
                continue
            every.add(address)
            if "UP" in interface.get("flags", ()):
                up.add(address)
    return up, every


def _hostname_addresses() -> set[IPAddress]:
    """What the host's name resolves to, which the reader adds (e.g. from /etc/hosts)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except (OSError, UnicodeError):
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}


def test_read_host_facts_on_this_machine_finds_the_kernels_addresses() -> None:
    up_before, every_before = _kernel_addresses()
    facts = read_host_facts()
    up_after, every_after = _kernel_addresses()
    # Read twice around the reader, so that an address coming or going meanwhile cannot fail the test.
    up, every = up_before & up_after, every_before | every_after
    assert up, "the kernel lists no address beyond loopback and link-local here: nothing to compare with"

    found = {ipaddress.ip_address(address.split("%")[0]) for address in facts.addresses}
    assert up <= found, f"addresses of interfaces that are up, not found: {sorted(map(str, up - found))}"
    assert found <= every | _hostname_addresses(), (
        f"found but not the host's: {sorted(map(str, found - every))}"
    )
    for ip in found:
        assert not ip.is_loopback and not (ip.version == 6 and ip.is_link_local)
    for address in (*facts.gateways, *facts.dns_servers):
        ipaddress.ip_address(address.split("%")[0])
    assert facts.network_types <= {"ethernet", "wireless", "vpn"}
    assert all(isinstance(value, str) and value for value in facts.extra.values())


def test_read_host_facts_on_a_fake_tree_returns_exactly_its_values(fake_root: Path) -> None:
    assert read_host_facts(fake_root) == HostFacts(
        addresses=("10.1.2.3", "2001:db8::42"),
        dns_servers=("10.1.0.53",),
        gateways=("10.1.1.1", "2001:db8::1"),
        network_types=frozenset({"ethernet", "vpn"}),
        extra={"hostname": "laptop-17", "os": "linux", "os_id": "debian", "domain": "corp.example"},
    )


def test_read_host_facts_on_an_empty_tree_is_empty(tmp_path: Path) -> None:
    assert read_host_facts(tmp_path) == HostFacts()


def test_read_host_facts_tolerates_garbage(tmp_path: Path) -> None:
    write(tmp_path, "proc/net/fib_trie", "|-- not-an-address\n   /32 host LOCAL\n")
    write(tmp_path, "proc/net/if_inet6", "zz 01\nxyz\n")
    write(tmp_path, "proc/net/route", "header\neth0 00000000 nothex 0003 0 0 0 00000000\nshort line\n")
    write(tmp_path, "proc/net/ipv6_route", "a b c\n" + "q " * 10 + "\n")
    write(tmp_path, "etc/resolv.conf", "nameserver\nnameserver not-an-ip\nnameserver 10.0.0.53\n")
    write(tmp_path, "sys/class/net", "a file where a directory belongs")
    facts = read_host_facts(tmp_path)
    assert facts == HostFacts(dns_servers=("10.0.0.53",))


def test_wireless_is_recognised_by_its_sysfs_directory_whatever_its_name(tmp_path: Path) -> None:
    add_interface(tmp_path, "wifi0", wireless=True)
    add_interface(tmp_path, "eth1", operstate="down")
    add_interface(tmp_path, "wg0", operstate="unknown")
    add_interface(tmp_path, "ppp0")
    assert read_network_types(tmp_path) == {"wireless", "vpn"}


def test_systemd_resolved_stub_is_looked_through(tmp_path: Path) -> None:
    write(tmp_path, "etc/resolv.conf", "nameserver 127.0.0.53\n")
    assert read_dns_servers(tmp_path) == ("127.0.0.53",)  # no upstream file: the stub is all there is
    write(tmp_path, "run/systemd/resolve/resolv.conf", "nameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    assert read_dns_servers(tmp_path) == ("192.0.2.53", "2001:db8::53")


# --- HostFacts and signatures -------------------------------------------------------------------------


def test_host_facts_are_immutable_copies() -> None:
    extra = {"domain": "corp.example"}
    facts = HostFacts(addresses=["10.0.0.1"], network_types={"vpn"}, extra=extra)  # type: ignore[arg-type]
    extra["domain"] = "changed"
    assert facts.addresses == ("10.0.0.1",)
    assert facts.network_types == frozenset({"vpn"})
    assert facts.extra == {"domain": "corp.example"}
    with pytest.raises(TypeError):
        facts.extra["domain"] = "x"  # type: ignore[index]
    same = HostFacts(
        addresses=("10.0.0.1",), network_types=frozenset({"vpn"}), extra={"domain": "corp.example"}
    )
    assert facts == same
    assert hash(facts) == hash(same)


def test_signature_is_stable_across_order_and_spelling() -> None:
    one = HostFacts(addresses=("10.0.0.1", "2001:db8::1"), extra={"a": "1", "b": "2"})
    two = HostFacts(addresses=("2001:0db8:0:0::0001", "10.0.0.1"), extra={"b": "2", "a": "1"})
    assert facts_signature(one) == facts_signature(two)
    assert facts_signature(one) == facts_signature(HostFacts(**one.__dict__))
    assert len(facts_signature(one)) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"addresses": ("10.0.0.2",)},
        {"dns_servers": ("10.0.0.53",)},
        {"gateways": ("10.0.0.254",)},
        {"network_types": frozenset({"wireless"})},
        {"extra": {"a": "1", "b": "3"}},
    ],
)
def test_signature_changes_with_any_field(change: dict[str, Any]) -> None:
    base = HostFacts(addresses=("10.0.0.1",), extra={"a": "1", "b": "2"})
    changed = dataclasses.replace(base, **change)
    assert facts_signature(changed) != facts_signature(base)


# --- facts files --------------------------------------------------------------------------------------

HOST = HostFacts(
    addresses=("10.1.2.3",),
    dns_servers=("10.1.0.53",),
    gateways=("10.1.1.1",),
    network_types=frozenset({"ethernet"}),
    extra={"hostname": "laptop-17", "domain": "corp.example"},
)


def test_a_facts_file_moves_the_agent_to_another_network(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    path.write_text(
        json.dumps(
            {
                "addresses": ["192.168.1.20", "2001:db8:ff::20"],
                "gateways": ["192.168.1.1"],
                "network_types": ["wireless", "vpn"],
                "extra": {"domain": "home.example", "site": "home", "hostname": None},
            }
        )
    )
    merged = merge_facts(HOST, load_facts_file(path))
    assert merged == HostFacts(
        addresses=("192.168.1.20", "2001:db8:ff::20"),
        dns_servers=("10.1.0.53",),  # not named in the file: the host's
        gateways=("192.168.1.1",),
        network_types=frozenset({"wireless", "vpn"}),
        extra={"domain": "home.example", "site": "home"},  # merged key by key; null removed hostname
    )
    assert facts_signature(merged) != facts_signature(HOST)


def test_an_empty_facts_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    path.write_text("{}")
    assert merge_facts(HOST, load_facts_file(path)) == HOST
    assert merge_facts(HOST, {"addresses": []}).addresses == ()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object, not list"),
        ('{"adresses": ["10.0.0.1"]}', "adresses"),
        ('{"addresses": "10.0.0.1"}', "addresses"),
        ('{"addresses": ["10.0.0.300"]}', "addresses: Value error, '10.0.0.300' does not appear"),
        ('{"gateways": [10]}', "gateways.0"),
        ('{"network_types": ["satellite"]}', "network_types.0"),
        ('{"extra": {"site": 3}}', "extra.site"),
        ('{"extra": ["site"]}', "extra"),
    ],
)
def test_a_malformed_facts_file_says_why(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "facts.json"
    path.write_text(content)
    with pytest.raises(FactsFileError, match="facts file") as caught:
        load_facts_file(path)
    assert reason in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_missing_or_binary_facts_file_says_why(tmp_path: Path) -> None:
    with pytest.raises(FactsFileError, match="cannot read facts file"):
        load_facts_file(tmp_path / "absent.json")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FactsFileError, match="cannot read facts file"):
        load_facts_file(binary)


def test_merge_facts_rejects_a_bad_mapping() -> None:
    with pytest.raises(FactsFileError, match=r"facts override is invalid: network_types\.0"):
        merge_facts(HOST, {"network_types": ["bluetooth"]})
