"""Benchmark 3's push half: what an idle push agent and a pushed policy change cost on the wire.

A paho MQTT 5 client (the agent) and another (the bridge) on a Mosquitto of their own, the agent's bytes
counted by the kernel on its socket (`bench.tcp_counters`). Over TLS by default, as Policycast's broker
listens (TLS only): the broker gets a certificate from a CA made for the run (`bench.servers.BenchTls`),
the clients trust exactly that CA (paho `tls_set_context`), and every figure includes the TLS records;
the connection's cost (TCP and TLS handshakes, CONNECT/CONNACK, the session tickets) is counted once,
apart. Plain MQTT with `tls=False`, for the figures from before TLS.

The broker authorises anonymously and keeps nothing: the wire format does not depend on how the broker
authorises its clients.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.servers import BenchTls
from bench.tcp_counters import Counters, WireCost
from local_stack.manager import pick_port

SETTLE_S = 0.5
"""Long enough for the ACKs of what was just sent (and TLS 1.3's session tickets) to be counted."""


class Mosquitto:
    """A Mosquitto (anonymous, no persistence) on a free local port; a TLS-only listener with `tls`."""

    def __init__(self, directory: Path, tls: BenchTls | None) -> None:
        from broker_bridge.mosquitto.install import mosquitto_binary

        self.port = pick_port(0)
        self.client_context: ssl.SSLContext | None = tls.client if tls is not None else None
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false"]
        # Started as root, Mosquitto drops to its own user, which cannot read the run's key (0600 in
        # a 0700 directory): stay this user, as Policycast's broker configuration does.
        lines.append(f"user {getpass.getuser()}")
        if tls is not None:
            files = tls.server_files("broker")
            lines += [f"certfile {files.certfile}", f"keyfile {files.keyfile}"]
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.argv = [mosquitto_binary(), "-c", str(self.config)]
        self.log = directory / "mosquitto.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mosquitto:
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


class Client:
    """A paho MQTT 5 client on its own network thread; counts PINGRESPs and received messages."""

    def __init__(self, port: int, client_id: str, keepalive: int, context: ssl.SSLContext | None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.pingresps = 0
        self._pinged = threading.Condition()
        self.messages: list[Any] = []
        self.received = threading.Event()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        if context is not None:
            self.client.tls_set_context(context)  # paho checks the name: 127.0.0.1 is in the certificate
        self.client.on_log = self._log
        self.client.on_message = self._message
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.connect("127.0.0.1", port, keepalive=keepalive, clean_start=True)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError(f"{client_id} did not connect")

    def _log(self, _client: Any, _userdata: Any, _level: int, message: str) -> None:
        if "PINGRESP" in message and "Received" in message:
            with self._pinged:
                self.pingresps += 1
                self._pinged.notify_all()

    def next_pingresp(self, timeout: float) -> int:
        """Wait for the next PINGRESP and return the count: the counters read right after it fall
        between two rounds (the next PINGREQ is a keep-alive away), never inside one."""
        with self._pinged:
            seen = self.pingresps
            if not self._pinged.wait_for(lambda: self.pingresps > seen, timeout):
                raise RuntimeError(f"no PINGRESP within {timeout} s")
            return self.pingresps

    def _message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self.messages.append(message)
        self.received.set()

    @property
    def socket(self) -> Any:
        return self.client.socket()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_size(topic: str, payload: bytes) -> int:
    """The size of an MQTT 5 QoS 1 PUBLISH without properties, from the specification."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + length_bytes + remaining


def measure_push(
    envelope: bytes, group_id: int, location_id: int, keepalive: int, idle_s: float, *, tls: bool
) -> dict[str, Any]:
    """The agent's connection, an idle keep-alive round and a pushed policy change, counted."""
    from fabric_core.settings import AgentSettings
    from fabric_core.topics import DEFAULT_PREFIX, config_topic

    topic = config_topic(DEFAULT_PREFIX, group_id, location_id)
    with tempfile.TemporaryDirectory(prefix="policycast-wire-") as tmp:
        run_tls = BenchTls(Path(tmp)) if tls else None
        with Mosquitto(Path(tmp), run_tls) as broker:
            agent = Client(broker.port, "wire-cost-agent", keepalive, broker.client_context)
            bridge = Client(broker.port, "wire-cost-bridge", 60, broker.client_context)
            try:
                # the connection: TCP and TLS handshakes, CONNECT and CONNACK, the session tickets
                time.sleep(SETTLE_S)
                connection = WireCost.of(Counters.of(agent.socket), 1)
                negotiated = _negotiated(agent.socket)
                result = agent.client.subscribe(topic, qos=1)
                assert result[0] == 0, result
                time.sleep(SETTLE_S)

                # idle: only keep-alives on the agent's connection, counted from just after one
                # round to just after another (a PINGREQ still unanswered must not count as half one)
                ping_within = 2 * keepalive + SETTLE_S
                pings = agent.next_pingresp(ping_within)
                before = Counters.of(agent.socket)
                time.sleep(idle_s)
                rounds = agent.next_pingresp(ping_within) - pings
                keepalive_round = WireCost.of(Counters.of(agent.socket) - before, rounds)

                change = _policy_change(agent, bridge, topic, envelope)
            finally:
                agent.close()
                bridge.close()
    default_keepalive = AgentSettings.model_fields["mqtt_keepalive_s"].default
    per_hour = 3600 / default_keepalive
    return {
        "transport": "mqtts" if tls else "mqtt",
        "tls": negotiated,
        "topic": topic,
        "connection": asdict(connection),
        "keepalive_measured_s": keepalive,
        "keepalive_round": asdict(keepalive_round),
        "idle_per_agent_per_hour": {
            "keepalive_s": default_keepalive,
            "rounds": per_hour,
            "tcp_payload_bytes": round(keepalive_round.app_bytes * per_hour),
            "ip_bytes": round(keepalive_round.ip_bytes * per_hour),
            "ethernet_bytes": round(keepalive_round.ethernet_bytes * per_hour),
        },
        "policy_change": asdict(change),
        "publish_bytes_by_spec": publish_size(topic, envelope),
        "envelope_bytes": len(envelope),
    }


def _policy_change(agent: Client, bridge: Client, topic: str, envelope: bytes) -> WireCost:
    """The bridge publishes the new document (retained, QoS 1) and the agent acknowledges it: counted
    on the agent's socket. A keep-alive round that falls in the window would be counted with it, so
    the change is sent again until one window holds the change alone."""
    for _ in range(5):
        agent.received.clear()
        before, pings = Counters.of(agent.socket), agent.pingresps
        info = bridge.client.publish(topic, envelope, qos=1, retain=True)
        info.wait_for_publish(10)
        if not agent.received.wait(10):
            raise RuntimeError("the agent did not receive the document")
        time.sleep(SETTLE_S)  # the PUBACK and the ACKs
        change = WireCost.of(Counters.of(agent.socket) - before, 1)
        assert agent.messages[-1].payload == envelope
        if agent.pingresps == pings:
            return change
    raise RuntimeError("every policy change shared its window with a keep-alive round")


def _negotiated(sock: Any) -> dict[str, Any] | None:
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cipher = sock.cipher()
    return {"version": sock.version(), "cipher": cipher[0] if cipher else None}
