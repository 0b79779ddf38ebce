"""The observer: one more subscriber on every config topic, in a process of its own, with its own account.

It timestamps each document the broker delivers it, on the same clock as the benchmark (`time.time()`),
and when asked waits for a serial per topic and checks what arrived (the serial, the signature, the
topic's group and location, the policy's version). What the manager, the bridge and the broker take to
deliver a change, without the fleet simulator's event loop: benchmarks 1 and 5 time the fabric with it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

from bench.stack import Stack, serial_of
from broker_bridge.broker import BrokerLink
from broker_bridge.mosquitto import dynsec
from broker_bridge.mosquitto.control import control
from fabric_core.errors import PolicycastError
from fabric_core.settings import parse_addresses
from fabric_core.signing import VerifyKey, open_envelope
from fabric_core.tls import client_context
from fabric_core.topics import all_configs_filter, parse_topic
from fabric_core.wire import MqttProtocol

OBSERVER = "bench-observer"
"""The name (plus a suffix per run) of the wildcard config subscriber's broker account and role."""


class Observer:
    """A wildcard subscriber on every config topic, in a process of its own, with its own account."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.process: Any = None
        self.conn: Connection | None = None

    def __enter__(self) -> Observer:
        stack = self.stack
        assert stack.manager is not None
        prefix = stack.settings.mqtt_prefix
        password = uuid.uuid4().hex
        # Its own name each time: the benchmarks' broker keeps its accounts between runs.
        self.name = name = f"{OBSERVER}-{uuid.uuid4().hex[:8]}"
        every = all_configs_filter(prefix)
        if stack.engine_name == "nats":
            # No account to make: the bridge's JWT reads every config subject (NATS binds no client id
            # to it); the observer connects with it under a client id of its own.
            username, password = stack.broker_engine.bridge_credentials()
        else:
            username = name
            self._make_account(name, password, every)
        verify = stack.manager.fabric.signing_key.verify_key
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_observe,
            args=(
                child,
                stack.settings.mqtt_url,
                stack.ca_file.read_bytes() if stack.ca_file is not None else None,
                username,
                password,
                name,
                stack.broker_engine.delivery.protocol,
                prefix,
                verify.kid,
                verify.public_base64,
            ),
            name="bench-observer",
            daemon=True,
        )
        self.process.start()
        child.close()
        ready = self._answer(60)
        if not ready.get("ok"):
            raise RuntimeError(f"the observer did not start: {ready}")
        return self

    def _make_account(self, name: str, password: str, every: str) -> None:
        """Mosquitto: the observer's dynamic-security client and role, reading every config topic."""
        link = self.stack.publisher("bench-observer-admin")
        try:
            dynsec.check(
                control(
                    link,
                    [
                        dynsec.create_role(
                            name,
                            [
                                dynsec.acl("subscribePattern", every),
                                dynsec.acl("publishClientReceive", every),
                            ],
                        ),
                        dynsec.create_client(name, password, [name]),
                    ],
                )
            )
        finally:
            link.close()

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError, EOFError):
                self.conn.send({"op": "stop"})
        if self.process is not None:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
        if self.stack.engine_name == "nats":
            return  # no account was made
        with contextlib.suppress(Exception):  # best effort: a leftover account reads configs, nothing more
            link = self.stack.publisher("bench-observer-admin")
            try:
                control(link, [dynsec.delete_client(self.name), dynsec.delete_role(self.name)])
            finally:
                link.close()

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.conn is not None
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the observer did not answer within {timeout:.0f}s")
        answer: dict[str, Any] = self.conn.recv()
        return answer

    def wait(
        self, expected: dict[str, int], *, since: float, timeout: float, version: int | None = None
    ) -> dict[str, Any]:
        """Wait for a document with at least the expected serial on each topic, received after `since`;
        report the last arrival and the checks of what arrived."""
        assert self.conn is not None
        self.conn.send(
            {"op": "wait", "expected": expected, "since": since, "timeout": timeout, "version": version}
        )
        return self._answer(timeout + 60)


def _observe(
    conn: Connection,
    mqtt_url: str,
    ca_pem: bytes | None,
    username: str,
    password: str,
    client_id: str,
    protocol: MqttProtocol,
    prefix: str,
    kid: str,
    public: str,
) -> None:
    """The observer process: record (time, topic, payload) of every message; check them when asked.
    Over `mqtts://` it trusts exactly the run's CA (`ca_pem`: a context does not cross processes).
    `mqtt_url` may name several nodes (a cluster): it connects to one and fails over."""
    key = VerifyKey.from_base64(kid, public)
    received: list[tuple[float, str, bytes]] = []

    def handler(topic: str, payload: bytes) -> None:
        received.append((time.time(), topic, payload))  # nothing else on paho's thread

    addresses = parse_addresses(mqtt_url)
    context = client_context(ca_pem) if addresses[0].tls and ca_pem is not None else None
    link = BrokerLink(
        addresses,
        username=username,
        password=password,
        client_id=client_id,
        ssl_context=context,
        protocol=protocol,
    )
    link.subscribe(all_configs_filter(prefix), handler, qos=0 if protocol == "3.1.1" else 1)
    try:
        link.connect(10)
    except Exception as exc:
        conn.send({"ok": False, "error": str(exc)})
        return
    conn.send({"ok": True})
    newest: dict[str, tuple[float, int, bytes]] = {}
    """The first arrival of the newest serial seen on each topic."""
    try:
        while True:
            request = conn.recv()
            if request["op"] != "wait":
                break
            conn.send(_wait(request, received, newest, key, prefix))
    except (EOFError, OSError):
        pass
    finally:
        link.close()


def _wait(
    request: dict[str, Any],
    received: list[tuple[float, str, bytes]],
    newest: dict[str, tuple[float, int, bytes]],
    key: VerifyKey,
    prefix: str,
) -> dict[str, Any]:
    expected: dict[str, int] = request["expected"]
    since: float = request["since"]
    deadline = time.monotonic() + request["timeout"]
    found: dict[str, tuple[float, int, bytes]] = {}
    while True:
        batch = received[:]
        del received[: len(batch)]
        for at, topic, payload in batch:
            if not payload:
                continue
            serial = serial_of(payload)
            held = newest.get(topic)
            if held is None or serial > held[1]:
                newest[topic] = (at, serial, payload)
            if at >= since and topic in expected and topic not in found and serial >= expected[topic]:
                found[topic] = (at, serial, payload)
        if len(found) == len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    checks = {"exact_serial": 0, "valid_signature": 0, "right_topic": 0, "right_version": 0}
    problems: list[str] = []
    for topic, (_, serial, payload) in found.items():
        try:
            doc = open_envelope(payload, key)
        except PolicycastError as exc:
            problems.append(f"{topic}: {exc}")
            continue
        checks["valid_signature"] += 1
        checks["exact_serial"] += serial == expected[topic] == doc["serial"]
        parsed = parse_topic(prefix, topic)
        checks["right_topic"] += (str(doc["group_id"]), str(doc["location_id"])) == (
            getattr(parsed, "group_id", None),
            getattr(parsed, "location_id", None),
        )
        version = request.get("version")
        checks["right_version"] += version is None or doc["policies"]["firewall"]["version"] == version
    times = [at for at, _, _ in found.values()]
    missing = sorted(set(expected) - set(found))
    return {
        "expected": len(expected),
        "arrived": len(found),
        **checks,
        "first_at": min(times, default=None),
        "last_at": max(times, default=None),
        "missing": missing[:5],
        "problems": problems[:5],
    }
