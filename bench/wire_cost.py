"""Benchmark 3: what a heartbeat, an idle push agent and a policy change cost on the wire.

Everything is counted by the kernel on the agent's own socket (`TCP_INFO`, read by `bench.tcp_counters`:
bytes sent and received, segments in and out, pure ACKs included), never estimated from message sizes:

- pull: the reference agent (`agent_stub.pull.PullLoop` and `agent_stub.core.AgentCore`, talking
  through `agent_stub.manager_client.ManagerClient` over its keep-alive `httpx` connection) heartbeating
  a real manager (`policycast serve`). An unchanged heartbeat is request + response on an open
  connection, headers included: the agent sends only Host, Content-Length, Authorization and
  Content-Type, and leaves its unchanged `status` out. The heartbeats are spaced out (`--gap`, more than
  Linux's 200 ms delayed-ACK ceiling), so that ACKs are counted as a real agent, which heartbeats every
  few minutes, sends them: on their own, not piggybacked on the next request. For comparison, on the
  same connection: the agent before it trimmed its heartbeats (httpx's default headers plus its own
  `Accept` and `User-Agent`, and the status every time), and a hand-written client that sends the same
  lean request in one write (the protocol's floor). The baseline is SEPM's published 3-5 KB per
  heartbeat.
- push, idle: a paho MQTT 5 client on a real Mosquitto with the agent's keep-alive, counting the
  PINGREQ/PINGRESP rounds (2 + 2 bytes of MQTT each) and their TCP segments, scaled to an hour at
  `POLICYCAST_AGENT_MQTT_KEEPALIVE_S` (60 s by default).
- a policy change: the retained QoS 1 PUBLISH of the new signed document to a subscribed agent, and the
  agent's PUBACK (push), and the heartbeat that brings the document (pull).

Everything is measured over TLS by default, as the manager serves HTTPS and the broker listens for MQTT
over TLS only: the manager's certificate from its CA (made in its data directory for the run), the
reference agent's httpx client and the hand-written client (`ssl` `wrap_socket`, server name
127.0.0.1) trusting exactly that CA; the broker's certificate from a CA made for the run, paho trusting
it (`bench.wire_push`). The counters then count TLS records, and every per-heartbeat and per-ping
figure includes them (TLS 1.3 adds 22 bytes a record: 5 of header, 1 of inner content type, 16 of
AEAD tag, and a write is a record); the HTTP bytes inside are given beside them, from the messages
(`http_bytes`). The connection's cost, once per connection, is counted apart: TCP and TLS handshakes
(with the TLS 1.3 session tickets the server sends after it) for HTTPS; the same plus CONNECT and
CONNACK for MQTT. `--plain` measures over plain HTTP and MQTT, the figures from before TLS.

Bytes "on the wire" are given three ways: the TCP payload (`app_bytes`: HTTP or MQTT bytes in plain,
TLS records over TLS), IP (plus 20 bytes of IPv4 and 20 + 12 of TCP with timestamps per segment, as
Linux sends them), and Ethernet (plus 38 bytes per frame: header, FCS, preamble and inter-frame gap).
The target (400 bytes) is about the HTTP bytes of an unchanged heartbeat.

    python -m bench.wire_cost            # over TLS; writes bench/results/wire_cost-<date>.json
    python -m bench.wire_cost --plain    # plain HTTP and MQTT, as before TLS
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.heartbeat_requests import HEARTBEAT_PATH
from bench.results import http_machine, write_result
from bench.servers import ADMIN_KEY, Server, manager_server, manager_tls
from bench.tcp_counters import Counters, WireCost
from bench.wire_push import measure_push

NAME = "wire_cost"
TARGET_BYTES = 400
SEPM_BYTES = (3000, 5000)
FIREWALL = {
    "rules": [
        {"name": f"rule-{i}", "action": "allow", "protocol": "tcp", "port": 1000 + i, "remote": "10.0.0.0/8"}
        for i in range(10)
    ]
}
ANTIVIRUS = {"scan": {"schedule": "daily", "at": "12:30", "paths": ["/home", "/srv"]}, "quarantine": True}


# --- pull: the reference agent heartbeating a real manager --------------------------------------------


class _SocketOf:
    """Remembers the socket of the connection that carried the last response (httpcore exposes it)."""

    def __init__(self) -> None:
        self.socket: Any = None
        self.last: httpx.Response | None = None

    async def __call__(self, response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        if stream is not None:
            self.socket = stream.get_extra_info("socket")
        self.last = response


async def _root_with_policies(admin: httpx.AsyncClient) -> tuple[int, list[dict[str, Any]]]:
    """The root group, with a 10-rule firewall and an antivirus policy assigned."""
    root = next(g for g in (await admin.get("/groups")).json() if g["parent_id"] is None)["id"]
    policies = []
    for name, kind, body in (("Firewall", "firewall", FIREWALL), ("Antivirus", "antivirus", ANTIVIRUS)):
        policy = (await admin.post("/policies", json={"name": name, "type": kind, "body": body})).json()
        response = await admin.put(f"/groups/{root}/policies/{kind}", json={"policy_id": policy["id"]})
        response.raise_for_status()
        policies.append(policy)
    return root, policies


def _reference_agent(url: str, enrolment: Any, http: httpx.AsyncClient) -> tuple[Any, Any]:
    """The reference agent's core (state in memory) and pull loop, talking through `ManagerClient`."""
    from agent_stub.core import AgentCore
    from agent_stub.manager_client import ManagerClient
    from agent_stub.pull import PullLoop
    from agent_stub.state import Identity, MemoryStateStore
    from fabric_core.settings import AgentSettings

    client = ManagerClient(server=url, agent_id=enrolment.agent_id, secret=enrolment.secret, http=http)
    identity = Identity.from_enrollment(server=url, response=enrolment, hostname="wire-cost-pc")
    core = AgentCore(identity=identity, store=MemoryStateStore(identity))
    return core, PullLoop(core, client, AgentSettings(), hostname="wire-cost-pc")


async def _pull(server: Server, heartbeats: int, gap: float) -> dict[str, Any]:
    from agent_stub.manager_client import ManagerClient

    url = server.url
    context = server.ssl_context  # the run's CA only; None over plain HTTP
    verify: ssl.SSLContext | bool = context or True
    admin = httpx.AsyncClient(
        base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, verify=verify
    )
    async with admin:
        root, policies = await _root_with_policies(admin)
        token = (await admin.post(f"/groups/{root}/enrollment-tokens", json={})).json()["token"]
        enrolment = await ManagerClient.enroll(
            server=url, token=token, hostname="wire-cost-pc", facts={}, ssl_context=context
        )
        hook = _SocketOf()
        http = httpx.AsyncClient(timeout=10, event_hooks={"response": [hook]}, verify=verify)
        core, agent = _reference_agent(url, enrolment, http)

        async with http:
            await agent.heartbeat_once()  # opens the connection, sends the status, gets the document
            assert core.document is not None and hook.last is not None
            await asyncio.sleep(gap)
            # everything on the connection so far: TCP and TLS handshakes, the first heartbeat (with
            # the status) and the document it brought
            first_exchange = WireCost.of(Counters.of(hook.socket), 1)
            first_http = _http_bytes(hook.last)
            first_request = hook.last.request.content
            assert b'"status"' in first_request, first_request
            serial, location = core.serial, core.location_id
            assert location is not None
            await agent.heartbeat_once()  # reports the applied serial: now the manager holds it all
            await asyncio.sleep(gap)
            unchanged = await _unchanged_heartbeats(agent, hook, heartbeats, gap, serial)
            assert hook.last is not None
            request_headers = _shown(hook.last.request.headers)
            response_headers = dict(hook.last.headers)
            request_body = hook.last.request.content
            response_body = hook.last.content
            unchanged_http = _http_bytes(hook.last)
            assert b'"status"' not in request_body, request_body

            previous = await _previous_agent(
                http, hook, url, enrolment.secret, _heartbeat_with_status(serial, location), heartbeats, gap
            )

            # a policy change: the operator edits the firewall; the next heartbeat brings the document
            firewall = policies[0]
            edited = {"rules": [*FIREWALL["rules"], {"name": "rule-new", "action": "deny", "port": 23}]}
            (await admin.put(f"/policies/{firewall['id']}", json={"body": edited})).raise_for_status()
            before = Counters.of(hook.socket)
            await agent.heartbeat_once()
            assert core.serial > serial, "the heartbeat did not bring the new document"
            await asyncio.sleep(gap)
            changed = WireCost.of(Counters.of(hook.socket) - before, 1)
            changed_http = _http_bytes(hook.last)
            envelope = _envelope_bytes(hook.last.content)
            new_serial = core.serial
        handshake = await asyncio.to_thread(_handshake, server.port, context, gap)
        lean = {
            name: await asyncio.to_thread(
                _lean_heartbeats, server.port, context, enrolment.secret, body, heartbeats, gap, new_serial
            )
            for name, body in (
                (
                    "same_body",
                    b'{"serial":%d,"location_id":%d,"mode":"pull"}' % (new_serial, location),
                ),
                ("with_status", _heartbeat_with_status(new_serial, location)),
            )
        }
    return {
        "transport": "https" if context is not None else "http",
        "connection": handshake,
        "first_exchange": {**asdict(first_exchange), "http_bytes": first_http},
        "unchanged_heartbeat": {**asdict(unchanged), "http_bytes": unchanged_http},
        "request_headers": request_headers,
        "request_body": request_body.decode(),
        "request_head_bytes": unchanged_http["out"] - len(request_body),
        "response_headers": response_headers,
        "response_body": response_body.decode(),
        "response_head_bytes": unchanged_http["in"] - len(response_body),
        "first_request_body": first_request.decode(),
        "previous_agent": previous,
        "changed_heartbeat": {**asdict(changed), "http_bytes": changed_http},
        "lean_client": lean,
        "document": {
            "group_id": root,
            "location_id": location,
            "serial": new_serial,
            "envelope_bytes": len(envelope),
        },
        "_envelope": envelope,
    }


async def _unchanged_heartbeats(agent: Any, hook: _SocketOf, count: int, gap: float, serial: int) -> WireCost:
    """`count` unchanged heartbeats of the reference agent, each answer checked, counted together."""
    before = Counters.of(hook.socket)
    for _ in range(count):
        await agent.heartbeat_once()
        assert hook.last is not None and hook.last.status_code == 200, hook.last
        reply = orjson.loads(hook.last.content)
        assert not reply["changed"] and reply["serial"] == serial, reply
        await asyncio.sleep(gap)
    return WireCost.of(Counters.of(hook.socket) - before, count)


def _heartbeat_with_status(serial: int, location_id: int) -> bytes:
    """An unchanged heartbeat's body as the agent sent it every time before: with its status."""
    from agent_stub import AGENT_VERSION
    from fabric_core.wire import HeartbeatRequest

    status = {"hostname": "wire-cost-pc", "agent_version": AGENT_VERSION}  # as agent_stub.pull builds it
    request = HeartbeatRequest(serial=serial, location_id=location_id, mode="pull", status=status)
    return request.model_dump_json(exclude_none=True).encode()


async def _previous_agent(
    http: httpx.AsyncClient, hook: _SocketOf, url: str, secret: str, body: bytes, count: int, gap: float
) -> dict[str, Any]:
    """Unchanged heartbeats as the agent sent them before it trimmed them, on the same connection:
    httpx's default headers plus the agent's `Accept` and `User-Agent`, and the status every time."""
    from agent_stub import AGENT_VERSION

    headers = {
        "User-Agent": f"policycast-agent/{AGENT_VERSION}",
        "Accept": "application/json",
        "Authorization": f"Bearer {secret}",
        "Content-Type": "application/json",
    }
    before = Counters.of(hook.socket)
    response = None
    for _ in range(count):
        response = await http.post(f"{url}{HEARTBEAT_PATH}", content=body, headers=headers)
        assert response.status_code == 200 and not response.json()["changed"], response.text
        await asyncio.sleep(gap)
    assert response is not None
    cost = WireCost.of(Counters.of(hook.socket) - before, count)
    http_bytes = _http_bytes(response)
    return {
        **asdict(cost),
        "http_bytes": http_bytes,
        "request_headers": _shown(response.request.headers),
        "request_body": body.decode(),
        "request_head_bytes": http_bytes["out"] - len(body),
    }


def _http_bytes(response: httpx.Response) -> dict[str, int]:
    """The HTTP/1.1 bytes of an exchange as h11 wrote and read them (`name: value` lines, the body as
    is): inside TLS the kernel counts records, and this is what they carry. In plain it equals the
    counters' bytes (the result shows both)."""
    request = response.request
    target = request.url.raw_path
    head_out = len(b"%s %s HTTP/1.1\r\n" % (request.method.encode(), target))
    head_out += sum(len(name) + 2 + len(value) + 2 for name, value in request.headers.raw) + 2
    reason = response.extensions.get("reason_phrase", b"")
    head_in = len(b"HTTP/1.1 %d %s\r\n" % (response.status_code, reason))
    head_in += sum(len(name) + 2 + len(value) + 2 for name, value in response.headers.raw) + 2
    out, into = head_out + len(request.content), head_in + len(response.content)
    return {"out": out, "in": into, "total": out + into}


def _open(port: int, context: ssl.SSLContext | None) -> socket.socket:
    """A connection to the manager as the hand-written client makes it: TCP_NODELAY, and over TLS the
    handshake done (the name checked: 127.0.0.1, as the agent connects; ALPN http/1.1, as httpx asks)."""
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is None:
        return raw
    context.set_alpn_protocols(["http/1.1"])
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _handshake(port: int, context: ssl.SSLContext | None, gap: float) -> dict[str, Any]:
    """What opening a connection costs before its first request: the TCP handshake (its segments; SYN
    and SYN-ACK carry no payload) and, over TLS, the TLS handshake with the session tickets the server
    sends after it (TLS 1.3), once per connection."""
    with _open(port, context) as sock:
        time.sleep(gap)  # the tickets and the ACKs
        cost = WireCost.of(Counters.of(sock), 1)
        negotiated = None
        if isinstance(sock, ssl.SSLSocket):
            cipher = sock.cipher()
            negotiated = {"version": sock.version(), "cipher": cipher[0] if cipher else None}
    return {**asdict(cost), "tls": negotiated}


def _lean_heartbeats(
    port: int, context: ssl.SSLContext | None, secret: str, body: bytes, count: int, gap: float, serial: int
) -> dict[str, Any]:
    """The protocol's floor: unchanged heartbeats from a client that sends only the headers HTTP/1.1 and
    the API need (Host, Authorization, Content-Type, Content-Length), in one write (one TLS record)."""
    head = (
        f"POST {HEARTBEAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    expected = b'{"changed":false,"serial":%d,' % serial
    received = 0
    with _open(port, context) as sock:
        before = None
        for index in range(count + 1):  # the first one opens the connection: not counted
            if index == 1:
                before = Counters.of(sock)
            sock.sendall(head + body)
            response = b""
            while b"\r\n\r\n" not in response or not response.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the manager closed the connection")
                response += chunk
            if not response.startswith(b"HTTP/1.1 200") or expected not in response:
                raise RuntimeError(f"unexpected answer: {response[:300]!r}")
            if index:
                received += len(response)
            time.sleep(gap)
        assert before is not None
        cost = WireCost.of(Counters.of(sock) - before, count)
    shown = (head + body).decode().replace(secret, f"<{len(secret)} characters>")
    sent = len(head + body)
    http_bytes = {"out": sent, "in": round(received / count), "total": sent + round(received / count)}
    return {"request": shown, **asdict(cost), "http_bytes": http_bytes}


def _envelope_bytes(heartbeat_response: bytes) -> bytes:
    """The signed envelope exactly as spliced into a changed heartbeat (`heartbeat_response_bytes`)."""
    marker = b',"config":'
    at = heartbeat_response.index(marker)
    envelope = heartbeat_response[at + len(marker) : -1]
    orjson.loads(envelope)  # it is the whole envelope
    return envelope


def _shown(headers: httpx.Headers) -> dict[str, str]:
    """Headers as the result file keeps them: the bearer secret's length counts, not its value."""
    shown = dict(headers)
    for name in list(shown):
        if name.lower() == "authorization":
            scheme, _, secret = shown[name].partition(" ")
            shown[name] = f"{scheme} <{len(secret)} characters>"
    return shown


# --- the benchmark -----------------------------------------------------------------------------------


async def _run(heartbeats: int, gap: float, keepalive: int, idle_s: float, *, tls: bool) -> dict[str, Any]:
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="policycast-wire-") as tmp:
        server = manager_server(Path(tmp), 1, tls=manager_tls(Path(tmp), 1) if tls else None)
        try:
            server.start()
            pull = await _pull(server, heartbeats, gap)
        finally:
            server.stop()
    envelope = pull.pop("_envelope")
    document = pull["document"]
    push = await asyncio.to_thread(
        measure_push, envelope, document["group_id"], document["location_id"], keepalive, idle_s, tls=tls
    )
    return {
        "name": NAME,
        "date": started.isoformat(timespec="seconds"),
        "machine": http_machine(),
        "config": {
            "heartbeats": heartbeats,
            "gap_s": gap,
            "keepalive_s": keepalive,
            "idle_s": idle_s,
            "tls": tls,
        },
        "summary": _summary(pull, push, len(envelope)),
        "pull": pull,
        "push": push,
    }


def _summary(pull: dict[str, Any], push: dict[str, Any], envelope_bytes: int) -> dict[str, Any]:
    """The headline figures. `*_bytes` of a heartbeat are its HTTP bytes (what the target is about);
    `*_tcp_payload_bytes` what TCP carried (TLS records over TLS); `*_ip_bytes` with the headers."""
    unchanged, lean = pull["unchanged_heartbeat"], pull["lean_client"]
    http = unchanged["http_bytes"]["total"]
    return {
        "transport": {"pull": pull["transport"], "push": push["transport"]},
        "unchanged_heartbeat_bytes": http,
        "unchanged_heartbeat_tcp_payload_bytes": unchanged["app_bytes"],
        "unchanged_heartbeat_tls_overhead_bytes": round(unchanged["app_bytes"] - http, 1),
        "unchanged_heartbeat_ip_bytes": unchanged["ip_bytes"],
        "unchanged_heartbeat_segments": unchanged["segments_out"] + unchanged["segments_in"],
        "https_connection_bytes": pull["connection"]["app_bytes"],
        "https_connection_ip_bytes": pull["connection"]["ip_bytes"],
        "first_exchange_ip_bytes": pull["first_exchange"]["ip_bytes"],
        "previous_agent_bytes": pull["previous_agent"]["http_bytes"]["total"],
        "previous_agent_ip_bytes": pull["previous_agent"]["ip_bytes"],
        "one_write_client_bytes": lean["same_body"]["http_bytes"]["total"],
        "one_write_client_tcp_payload_bytes": lean["same_body"]["app_bytes"],
        "one_write_client_ip_bytes": lean["same_body"]["ip_bytes"],
        "one_write_client_with_status_bytes": lean["with_status"]["http_bytes"]["total"],
        "target_bytes": TARGET_BYTES,
        "target_met": http <= TARGET_BYTES,
        "baseline_sepm_bytes": list(SEPM_BYTES),
        "ratio_to_sepm_low": round(http / SEPM_BYTES[0], 3),
        "mqtt_connection_tcp_payload_bytes": push["connection"]["app_bytes"],
        "mqtt_connection_ip_bytes": push["connection"]["ip_bytes"],
        "push_keepalive_round_tcp_payload_bytes": push["keepalive_round"]["app_bytes"],
        "push_idle_bytes_per_agent_hour_tcp_payload": push["idle_per_agent_per_hour"]["tcp_payload_bytes"],
        "push_idle_bytes_per_agent_hour_ip": push["idle_per_agent_per_hour"]["ip_bytes"],
        "policy_change_push_tcp_payload_bytes": push["policy_change"]["app_bytes"],
        "policy_change_push_ip_bytes": push["policy_change"]["ip_bytes"],
        "policy_change_publish_bytes_by_spec": push["publish_bytes_by_spec"],
        "policy_change_pull_bytes": pull["changed_heartbeat"]["http_bytes"]["total"],
        "policy_change_pull_tcp_payload_bytes": pull["changed_heartbeat"]["app_bytes"],
        "policy_change_pull_ip_bytes": pull["changed_heartbeat"]["ip_bytes"],
        "envelope_bytes": envelope_bytes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark 3 (the `python -m bench` entry point): see the module's docstring."""
    quick = bool(getattr(args, "quick", False))
    heartbeats = int(getattr(args, "heartbeats", None) or (5 if quick else 20))
    gap = float(getattr(args, "gap", None) or 0.3)
    keepalive = int(getattr(args, "keepalive", None) or 5)
    idle_s = float(getattr(args, "idle", None) or (11 if quick else 31))
    tls = not getattr(args, "plain", False)
    return asyncio.run(_run(heartbeats, gap, keepalive, idle_s, tls=tls))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heartbeats", type=int, help="unchanged heartbeats counted (default 20)")
    parser.add_argument("--gap", type=float, help="seconds between heartbeats (default 0.3)")
    parser.add_argument("--keepalive", type=int, help="MQTT keep-alive while measuring (default 5 s)")
    parser.add_argument("--idle", type=float, help="seconds of idle push connection counted (default 31)")
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--plain", action="store_true", help="plain HTTP and MQTT, as before TLS")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wire_cost", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, help="results file (default bench/results/wire_cost-<date>.json)")
    args = parser.parse_args(argv)
    result = run(args)
    out = write_result(NAME, result, args.out)
    print(json.dumps(result["summary"], indent=2))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
