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

Bytes "on the wire" are given three ways: the application's (HTTP or MQTT bytes, what the target is
about), IP (plus 20 bytes of IPv4 and 20 + 12 of TCP with timestamps per segment, as Linux sends them),
and Ethernet (plus 38 bytes per frame: header, FCS, preamble and inter-frame gap). Over TLS add about
22 bytes per record (TLS 1.3) and the handshake once per connection; not measured here.

    python -m bench.wire_cost            # writes bench/results/wire_cost-<date>.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.heartbeat_requests import HEARTBEAT_PATH
from bench.results import http_machine, write_result
from bench.servers import ADMIN_KEY, Server, manager_server
from bench.tcp_counters import Counters, WireCost
from local_stack.manager import pick_port

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

    url = f"http://127.0.0.1:{server.port}"
    admin = httpx.AsyncClient(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    async with admin:
        root, policies = await _root_with_policies(admin)
        token = (await admin.post(f"/groups/{root}/enrollment-tokens", json={})).json()["token"]
        enrolment = await ManagerClient.enroll(server=url, token=token, hostname="wire-cost-pc", facts={})
        hook = _SocketOf()
        http = httpx.AsyncClient(timeout=10, event_hooks={"response": [hook]})
        core, agent = _reference_agent(url, enrolment, http)

        async with http:
            await agent.heartbeat_once()  # opens the connection, sends the status, gets the document
            assert core.document is not None and hook.last is not None
            first_request = hook.last.request.content
            assert b'"status"' in first_request, first_request
            serial, location = core.serial, core.location_id
            assert location is not None
            await asyncio.sleep(gap)
            await agent.heartbeat_once()  # reports the applied serial: now the manager holds it all
            await asyncio.sleep(gap)
            before = Counters.of(hook.socket)
            for _ in range(heartbeats):
                await agent.heartbeat_once()
                assert hook.last is not None and hook.last.status_code == 200, hook.last
                reply = orjson.loads(hook.last.content)
                assert not reply["changed"] and reply["serial"] == serial, reply
                await asyncio.sleep(gap)
            unchanged = WireCost.of(Counters.of(hook.socket) - before, heartbeats)
            assert hook.last is not None
            request_headers = _shown(hook.last.request.headers)
            response_headers = dict(hook.last.headers)
            request_body = hook.last.request.content
            response_body = hook.last.content
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
            envelope = _envelope_bytes(hook.last.content)
            new_serial = core.serial
        lean = {
            name: await asyncio.to_thread(
                _lean_heartbeats, server.port, enrolment.secret, body, heartbeats, gap, new_serial
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
        "unchanged_heartbeat": asdict(unchanged),
        "request_headers": request_headers,
        "request_body": request_body.decode(),
        "request_head_bytes": unchanged.app_bytes_out - len(request_body),
        "response_headers": response_headers,
        "response_body": response_body.decode(),
        "response_head_bytes": unchanged.app_bytes_in - len(response_body),
        "first_request_body": first_request.decode(),
        "previous_agent": previous,
        "changed_heartbeat": asdict(changed),
        "lean_client": lean,
        "document": {
            "group_id": root,
            "location_id": location,
            "serial": new_serial,
            "envelope_bytes": len(envelope),
        },
        "_envelope": envelope,
    }


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
    return {
        **asdict(cost),
        "request_headers": _shown(response.request.headers),
        "request_body": body.decode(),
        "request_head_bytes": cost.app_bytes_out - len(body),
    }


def _lean_heartbeats(
    port: int, secret: str, body: bytes, count: int, gap: float, serial: int
) -> dict[str, Any]:
    """The protocol's floor: unchanged heartbeats from a client that sends only the headers HTTP/1.1 and
    the API need (Host, Authorization, Content-Type, Content-Length), in one write."""
    head = (
        f"POST {HEARTBEAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    expected = b'{"changed":false,"serial":%d,' % serial
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            time.sleep(gap)
        assert before is not None
        cost = WireCost.of(Counters.of(sock) - before, count)
    shown = (head + body).decode().replace(secret, f"<{len(secret)} characters>")
    return {"request": shown, **asdict(cost)}


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


# --- push: a real Mosquitto --------------------------------------------------------------------------


class _Mosquitto:
    """A plain Mosquitto (anonymous, no persistence) on a free local port: the wire format does not
    depend on how the broker authorises its clients."""

    def __init__(self, directory: Path) -> None:
        from broker_bridge.mosquitto.install import mosquitto_binary

        self.port = pick_port(0)
        self.config = directory / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.argv = [mosquitto_binary(), "-c", str(self.config)]
        self.log = directory / "mosquitto.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Mosquitto:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)

    def __exit__(self, *_: object) -> None:
        if self.popen is not None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class _Client:
    """A paho MQTT 5 client on its own network thread; counts PINGRESPs and received messages."""

    def __init__(self, port: int, client_id: str, keepalive: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.pingresps = 0
        self.messages: list[Any] = []
        self.received = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_log = self._log
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port, keepalive=keepalive, clean_start=True)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{client_id} did not connect")
            time.sleep(0.01)

    def _log(self, _client: Any, _userdata: Any, _level: int, message: str) -> None:
        if "PINGRESP" in message and "Received" in message:
            self.pingresps += 1

    def _message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self.messages.append(message)
        self.received.set()

    @property
    def socket(self) -> Any:
        return self.client.socket()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish_size(topic: str, payload: bytes) -> int:
    """The size of an MQTT 5 QoS 1 PUBLISH without properties, from the specification."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + length_bytes + remaining


def _push(envelope: bytes, group_id: int, location_id: int, keepalive: int, idle_s: float) -> dict[str, Any]:
    from fabric_core.settings import AgentSettings
    from fabric_core.topics import DEFAULT_PREFIX, config_topic

    topic = config_topic(DEFAULT_PREFIX, group_id, location_id)
    with tempfile.TemporaryDirectory(prefix="policycast-wire-") as tmp, _Mosquitto(Path(tmp)) as broker:
        agent = _Client(broker.port, "wire-cost-agent", keepalive)
        bridge = _Client(broker.port, "wire-cost-bridge", 60)
        try:
            result = agent.client.subscribe(topic, qos=1)
            assert result[0] == 0, result
            time.sleep(0.5)

            # idle: only keep-alives on the agent's connection
            before, pings = Counters.of(agent.socket), agent.pingresps
            time.sleep(idle_s)
            rounds = agent.pingresps - pings
            if rounds == 0:
                raise RuntimeError(f"no PINGRESP in {idle_s}s at keepalive {keepalive}s")
            keepalive_round = WireCost.of(Counters.of(agent.socket) - before, rounds)

            # a policy change: the bridge publishes the new document, retained, QoS 1
            before = Counters.of(agent.socket)
            info = bridge.client.publish(topic, envelope, qos=1, retain=True)
            info.wait_for_publish(10)
            if not agent.received.wait(10):
                raise RuntimeError("the agent did not receive the document")
            time.sleep(0.5)  # the PUBACK and the ACKs
            change = WireCost.of(Counters.of(agent.socket) - before, 1)
            assert agent.messages[-1].payload == envelope
        finally:
            agent.close()
            bridge.close()
    default_keepalive = AgentSettings.model_fields["mqtt_keepalive_s"].default
    per_hour = 3600 / default_keepalive
    return {
        "topic": topic,
        "keepalive_measured_s": keepalive,
        "keepalive_round": asdict(keepalive_round),
        "idle_per_agent_per_hour": {
            "keepalive_s": default_keepalive,
            "rounds": per_hour,
            "mqtt_bytes": round(keepalive_round.app_bytes * per_hour),
            "ip_bytes": round(keepalive_round.ip_bytes * per_hour),
            "ethernet_bytes": round(keepalive_round.ethernet_bytes * per_hour),
        },
        "policy_change": asdict(change),
        "publish_bytes_by_spec": _publish_size(topic, envelope),
        "envelope_bytes": len(envelope),
    }


# --- the benchmark -----------------------------------------------------------------------------------


async def _run(heartbeats: int, gap: float, keepalive: int, idle_s: float) -> dict[str, Any]:
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="policycast-wire-") as tmp:
        server = manager_server(Path(tmp), 1)
        try:
            server.start()
            pull = await _pull(server, heartbeats, gap)
        finally:
            server.stop()
    envelope = pull.pop("_envelope")
    document = pull["document"]
    push = await asyncio.to_thread(
        _push, envelope, document["group_id"], document["location_id"], keepalive, idle_s
    )
    unchanged = pull["unchanged_heartbeat"]
    return {
        "name": NAME,
        "date": started.isoformat(timespec="seconds"),
        "machine": http_machine(),
        "config": {"heartbeats": heartbeats, "gap_s": gap, "keepalive_s": keepalive, "idle_s": idle_s},
        "summary": {
            "unchanged_heartbeat_bytes": unchanged["app_bytes"],
            "unchanged_heartbeat_ip_bytes": unchanged["ip_bytes"],
            "unchanged_heartbeat_segments": unchanged["segments_out"] + unchanged["segments_in"],
            "previous_agent_bytes": pull["previous_agent"]["app_bytes"],
            "previous_agent_ip_bytes": pull["previous_agent"]["ip_bytes"],
            "one_write_client_bytes": pull["lean_client"]["same_body"]["app_bytes"],
            "one_write_client_ip_bytes": pull["lean_client"]["same_body"]["ip_bytes"],
            "one_write_client_with_status_bytes": pull["lean_client"]["with_status"]["app_bytes"],
            "target_bytes": TARGET_BYTES,
            "target_met": unchanged["app_bytes"] <= TARGET_BYTES,
            "baseline_sepm_bytes": list(SEPM_BYTES),
            "ratio_to_sepm_low": round(unchanged["app_bytes"] / SEPM_BYTES[0], 3),
            "push_idle_bytes_per_agent_hour_mqtt": push["idle_per_agent_per_hour"]["mqtt_bytes"],
            "push_idle_bytes_per_agent_hour_ip": push["idle_per_agent_per_hour"]["ip_bytes"],
            "policy_change_push_bytes": push["policy_change"]["app_bytes"],
            "policy_change_push_ip_bytes": push["policy_change"]["ip_bytes"],
            "policy_change_publish_bytes_by_spec": push["publish_bytes_by_spec"],
            "policy_change_pull_bytes": pull["changed_heartbeat"]["app_bytes"],
            "envelope_bytes": len(envelope),
        },
        "pull": pull,
        "push": push,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark 3 (the `python -m bench` entry point): see the module's docstring."""
    quick = bool(getattr(args, "quick", False))
    heartbeats = int(getattr(args, "heartbeats", None) or (5 if quick else 20))
    gap = float(getattr(args, "gap", None) or 0.3)
    keepalive = int(getattr(args, "keepalive", None) or 5)
    idle_s = float(getattr(args, "idle", None) or (11 if quick else 31))
    return asyncio.run(_run(heartbeats, gap, keepalive, idle_s))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heartbeats", type=int, help="unchanged heartbeats counted (default 20)")
    parser.add_argument("--gap", type=float, help="seconds between heartbeats (default 0.3)")
    parser.add_argument("--keepalive", type=int, help="MQTT keep-alive while measuring (default 5 s)")
    parser.add_argument("--idle", type=float, help="seconds of idle push connection counted (default 31)")
    parser.add_argument("--quick", action="store_true", help="fewer samples")


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
