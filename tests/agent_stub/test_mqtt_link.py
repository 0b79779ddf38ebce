"""MqttLink against the project's Mosquitto (the `mosquitto` fixture: dynamic security, agents on their own
accounts, the bridge on its own): acknowledgements, refusals, timeouts, will, sessions, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent_stub.errors import LinkDisconnected, LinkRefused, LinkUnavailable
from agent_stub.mqtt_link import LinkOptions, Message, MqttLink
from fabric_core.settings import MqttAddress
from fabric_core.topics import DEFAULT_PREFIX, cmd_topic, config_topic, group_config_filter, state_topic
from tests.agent_stub.conftest import WAIT_S
from tests.support.broker import Broker
from tests.support.certificates import self_signed_certificate
from tests.support.processes import free_port
from tests.support.waiting import wait_for_async

T = TypeVar("T")
AGENT = "a-1"
GROUP = 1
STATE = state_topic(DEFAULT_PREFIX, AGENT)
CMD = cmd_topic(DEFAULT_PREFIX, AGENT)


class Inbox:
    """Messages received by one link, in order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.received: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.append((message.topic, message.payload))
        self.received.append(message)

    def payloads(self, topic: str) -> list[bytes]:
        return [payload for t, payload in self.messages if t == topic]


def _link(address: MqttAddress, inbox: Inbox | None = None, **options: Any) -> MqttLink:
    options.setdefault("client_id", f"test-{uuid.uuid4().hex[:8]}")
    options.setdefault("timeout_s", 2.0)
    return MqttLink(LinkOptions(address=address, **options), inbox or Inbox())


def _bridge(
    broker: Broker, inbox: Inbox | None = None, *, address: MqttAddress | None = None, **options: Any
) -> MqttLink:
    """A link on the bridge's account: it publishes documents and commands, and reads agents' states."""
    credentials = {"username": broker.bridge_username, "password": broker.bridge_password}
    options.setdefault("ssl_context", broker.ssl_context)
    return _link(address or broker.address, inbox, **credentials, **options)


def _agent(broker: Broker, inbox: Inbox | None = None, *, group_id: int = GROUP, **options: Any) -> MqttLink:
    """A link on agent a-1's own account, provisioned now: it reads its group's config topics and its
    cmd topic, and writes its state topic."""
    password = broker.provision(AGENT, group_id)
    options.setdefault("ssl_context", broker.ssl_context)
    return _link(broker.address, inbox, client_id=AGENT, username=AGENT, password=password, **options)


async def _marker(publisher: MqttLink, inbox: Inbox, topic: str) -> bytes:
    """Publish a unique marker on `topic` and wait until `inbox` has it. The broker keeps the order of
    what it takes in, so whatever it had taken in for that subscriber before has arrived by then: a
    negative check ("nothing else came") without waiting out a window."""
    marker = f"marker-{secrets.token_hex(6)}".encode()
    await publisher.publish(Message(topic, marker, qos=1))
    await wait_for_async(
        lambda: marker in inbox.payloads(topic), timeout=WAIT_S, what="marker in inbox.payloads(topic)"
    )
    return marker


def _disconnections(broker: Broker, client_id: str) -> int:
    """How many clean DISCONNECTs of `client_id` the broker has handled (its log says so once it has,
    after dealing with the will)."""
    return broker.layout.log_path.read_text(errors="replace").count(f"Client {client_id} disconnected.")


def _run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def test_publish_subscribe_and_a_retained_message_for_a_late_joiner(mosquitto: Broker) -> None:
    inbox = Inbox()
    topic = config_topic(DEFAULT_PREFIX, GROUP, 2)

    async def scenario() -> None:
        publisher, subscriber = _bridge(mosquitto), _agent(mosquitto, inbox)
        assert await publisher.connect() is False and publisher.connected
        await publisher.publish(Message(topic, b"retained", qos=1, retain=True))
        await subscriber.connect()
        await subscriber.subscribe(CMD, qos=1)  # for the marker below
        assert await subscriber.subscribe(group_config_filter(DEFAULT_PREFIX, GROUP), qos=1) == 1
        await wait_for_async(
            lambda: inbox.payloads(topic) == [b"retained"],
            timeout=WAIT_S,
            what='inbox.payloads(topic) == [b"retained"]',
        )
        await publisher.publish(Message(topic, b"live", qos=1))
        await publisher.publish(Message(topic, b"qos0", qos=0))
        await wait_for_async(
            lambda: len(inbox.messages) == 3, timeout=WAIT_S, what="len(inbox.messages) == 3"
        )
        await subscriber.unsubscribe(group_config_filter(DEFAULT_PREFIX, GROUP))
        await publisher.publish(Message(topic, b"after", qos=1))
        marker = await _marker(publisher, inbox, CMD)
        assert inbox.messages == [(topic, b"retained"), (topic, b"live"), (topic, b"qos0"), (CMD, marker)]
        await publisher.close()
        await subscriber.close()
        assert not publisher.connected and publisher.disconnected.is_set()

    _run(scenario)


def test_a_received_message_is_the_message_type_with_its_qos_and_retain_flag(mosquitto: Broker) -> None:
    inbox = Inbox()
    topic = config_topic(DEFAULT_PREFIX, GROUP, 6)

    async def scenario() -> None:
        publisher, subscriber = _bridge(mosquitto), _agent(mosquitto, inbox)
        await publisher.connect()
        await publisher.publish(Message(topic, b"retained", qos=1, retain=True))
        await subscriber.connect()
        await subscriber.subscribe(topic, qos=1)
        await wait_for_async(
            lambda: len(inbox.received) == 1, timeout=WAIT_S, what="len(inbox.received) == 1"
        )
        await publisher.publish(Message(topic, b"live", qos=1))
        await publisher.publish(Message(topic, b"qos0", qos=0))
        await wait_for_async(
            lambda: len(inbox.received) == 3, timeout=WAIT_S, what="len(inbox.received) == 3"
        )
        await publisher.close()
        await subscriber.close()

    _run(scenario)
    assert inbox.received == [
        Message(topic, b"retained", qos=1, retain=True),  # sent to a new subscription: retained
        Message(topic, b"live", qos=1, retain=False),
        Message(topic, b"qos0", qos=0, retain=False),
    ]


def test_refusals_carry_the_reason_code(mosquitto: Broker) -> None:
    async def scenario() -> None:
        link = _agent(mosquitto)
        await link.connect()
        with pytest.raises(LinkRefused) as refused:
            # Another agent's state topic: outside the account's ACL, dynamic security refuses it.
            await link.publish(Message(state_topic(DEFAULT_PREFIX, "a-2"), b"x", qos=1))
        assert (refused.value.reason_code, refused.value.reason) == (0x87, "Not authorized")
        with pytest.raises(LinkRefused) as refused:
            await link.subscribe(cmd_topic(DEFAULT_PREFIX, "a-2"))  # another agent's commands
        assert (refused.value.reason_code, refused.value.reason) == (0x87, "Not authorized")
        assert link.connected  # a refused publication or subscription does not end the session
        await link.close()

        # CONNACK refusals: a wrong password for the agent's account, and an account the broker does not
        # know. Dynamic security answers both alike, Not authorized, telling an intruder nothing.
        for username in (AGENT, "nobody"):
            locked = _link(
                mosquitto.address,
                client_id=username,
                username=username,
                password="wrong",
                ssl_context=mosquitto.ssl_context,
            )
            with pytest.raises(LinkRefused) as refused:
                await locked.connect()
            assert refused.value.operation == "connect"
            assert (refused.value.reason_code, refused.value.reason) == (0x87, "Not authorized")
            assert not locked.connected

    _run(scenario)


def test_operations_without_a_connection_fail_at_once(mosquitto: Broker) -> None:
    async def scenario() -> None:
        link = _link(mosquitto.address, ssl_context=mosquitto.ssl_context)
        with pytest.raises(LinkDisconnected):
            await link.subscribe(CMD)
        with pytest.raises(LinkDisconnected):
            await link.publish(Message(STATE, b"x"))
        await link.close()  # nothing to close: no error

    _run(scenario)


def test_an_unreachable_broker_fails_fast() -> None:
    async def scenario() -> float:
        link = _link(MqttAddress("127.0.0.1", free_port()))
        started = time.monotonic()
        with pytest.raises(LinkUnavailable, match="cannot connect"):
            await link.connect()
        return time.monotonic() - started

    assert _run(scenario) < 1.0


def test_a_silent_server_times_out_without_blocking_the_loop() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never answers MQTT
        port = silent.getsockname()[1]

        async def scenario() -> tuple[float, int]:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)  # not a wait: the ticker counts the loop's turns
                    ticks += 1

            task = asyncio.create_task(ticker())
            link = _link(MqttAddress("127.0.0.1", port), timeout_s=0.3)
            started = time.monotonic()
            with pytest.raises(LinkUnavailable, match="did not accept a session"):
                await link.connect()
            task.cancel()
            return time.monotonic() - started, ticks

        elapsed, ticks = _run(scenario)
    assert 0.25 < elapsed < 1.0
    assert ticks > 10  # the loop kept running other work while waiting


# --- several nodes --------------------------------------------------------------------------------------


class _FirstChoice(random.Random):
    """Picks the first of the candidate nodes (in the order of the list): the order becomes visible."""

    def choice(self, seq: Any) -> Any:
        return seq[0]


async def _tried(link: MqttLink, attempts: int) -> list[tuple[int, bool]]:
    """The port of each of `attempts` failing connects, and whether the link fails over after it."""
    tried = []
    for _ in range(attempts):
        with pytest.raises(LinkUnavailable):
            await link.connect()
        tried.append((link.address.port, link.fails_over))
    return tried


def test_after_a_node_drops_the_session_the_live_nodes_are_tried_first(mosquitto: Broker) -> None:
    """The agents of a node that went away keep to the others (which may be busy for a while, as a NATS
    cluster electing a leader): the node that dropped the session counts two failures, one that took
    the connection but not the session one, so it is tried again only after each of those failed twice."""
    with socket.create_server(("127.0.0.1", 0)) as busy_a, socket.create_server(("127.0.0.1", 0)) as busy_b:
        a, b = (MqttAddress("127.0.0.1", server.getsockname()[1]) for server in (busy_a, busy_b))

        async def scenario() -> list[tuple[int, bool]]:
            link = _agent(mosquitto, addresses=(mosquitto.address, a, b), rng=_FirstChoice(), timeout_s=0.3)
            await link.connect()
            assert link.address == mosquitto.address and not link.fails_over
            mosquitto.stop()
            await asyncio.wait_for(link.disconnected.wait(), timeout=WAIT_S)
            assert link.fails_over and link.untried == 2  # the node went away: two others to go to
            return await _tried(link, 5)

        try:
            tried = _run(scenario)
        finally:
            mosquitto.start()
    dead = mosquitto.address.port
    assert tried == [(a.port, True), (b.port, False), (a.port, False), (b.port, False), (dead, False)]


def test_a_node_that_refuses_the_connection_is_tried_after_one_that_took_it() -> None:
    """Refused at the TCP level (nothing listens) weighs double; the node tried last is tried again when
    it failed less than any other."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        refusing = MqttAddress("127.0.0.1", free_port())
        taking = MqttAddress("127.0.0.1", busy.getsockname()[1])

        async def scenario() -> list[tuple[int, bool]]:
            link = _link(refusing, addresses=(refusing, taking), rng=_FirstChoice(), timeout_s=0.3)
            return await _tried(link, 4)

        tried = _run(scenario)
    assert tried == [
        (refusing.port, True),
        (taking.port, False),
        (taking.port, False),
        (refusing.port, False),
    ]


def test_the_will_is_published_on_abort_and_not_on_close(mosquitto: Broker) -> None:
    inbox = Inbox()

    async def scenario() -> None:
        observer = _bridge(mosquitto, inbox)
        await observer.connect()
        await observer.subscribe(STATE)
        agent = _agent(mosquitto, will=Message(STATE, b"offline", qos=1, retain=True), session_expiry_s=60)
        await agent.connect()
        await agent.publish(Message(STATE, b"online", retain=True))
        await wait_for_async(
            lambda: inbox.payloads(STATE) == [b"online"],
            timeout=WAIT_S,
            what='inbox.payloads(STATE) == [b"online"]',
        )

        agent.abort()  # as a crash: no DISCONNECT
        assert not agent.connected and agent.disconnected.is_set()
        await wait_for_async(
            lambda: inbox.payloads(STATE) == [b"online", b"offline"],
            timeout=WAIT_S,
            what='inbox.payloads(STATE) == [b"online", b"offline"]',
        )

        assert await agent.connect() is True  # the broker kept the session
        closed = _disconnections(mosquitto, AGENT)
        await agent.close()
        # Once the broker has handled the DISCONNECT (and with it the will), a marker comes after any will.
        await wait_for_async(
            lambda: _disconnections(mosquitto, AGENT) > closed,
            timeout=WAIT_S,
            what="_disconnections(mosquitto, AGENT) > closed",
        )
        marker = await _marker(observer, inbox, STATE)
        assert inbox.payloads(STATE) == [b"online", b"offline", marker]  # a clean close sends no will
        await observer.close()

    _run(scenario)


def test_a_persistent_session_queues_messages_until_it_is_ended(mosquitto: Broker) -> None:
    inbox = Inbox()

    async def scenario() -> None:
        publisher = _bridge(mosquitto)
        await publisher.connect()
        agent = _agent(mosquitto, inbox, session_expiry_s=60)
        await agent.connect()
        await agent.subscribe(CMD)
        await agent.close()  # the session stays
        await publisher.publish(Message(CMD, b"while away", qos=1))
        assert await agent.connect() is True
        await wait_for_async(
            lambda: inbox.payloads(CMD) == [b"while away"],
            timeout=WAIT_S,
            what='inbox.payloads(CMD) == [b"while away"]',
        )

        await agent.close(end_session=True)
        await publisher.publish(Message(CMD, b"lost", qos=1))
        assert await agent.connect() is False  # a fresh session: nothing queued, nothing subscribed
        # Subscribed again, a marker comes after anything a kept session would have delivered at once.
        await agent.subscribe(CMD)
        marker = await _marker(publisher, inbox, CMD)
        assert inbox.payloads(CMD) == [b"while away", marker]
        await agent.close()
        await publisher.close()

    _run(scenario)


def test_a_stopped_broker_disconnects_and_fails_waiting_operations(mosquitto: Broker) -> None:
    async def scenario() -> None:
        link = _agent(mosquitto)
        await link.connect()
        mosquitto.stop()
        await asyncio.wait_for(link.disconnected.wait(), timeout=5)
        assert not link.connected
        with pytest.raises(LinkDisconnected):
            await link.subscribe(CMD)
        with pytest.raises(LinkUnavailable):
            await link.connect()
        mosquitto.start()
        await link.connect()
        assert link.connected
        await link.close()

    _run(scenario)


def test_tls_handshake_through_the_loop(tmp_path: Path) -> None:
    """MQTT over TLS on the project's broker configuration (`MosquittoEngine.write_config(tls=...)`)."""
    cert, key = self_signed_certificate(tmp_path / "certs")
    tls_broker = Broker(tmp_path / "tls-broker", certificates=(cert, key)).start()
    inbox = Inbox()
    try:

        async def scenario() -> None:
            context = ssl.create_default_context(cafile=str(cert))
            link = _bridge(tls_broker, inbox, address=tls_broker.tls_address, ssl_context=context)
            await link.connect()
            await link.subscribe(STATE)
            await link.publish(Message(STATE, b"x" * 100_000, qos=1))  # spans many TLS records
            await wait_for_async(
                lambda: len(inbox.messages) == 1, timeout=WAIT_S, what="len(inbox.messages) == 1"
            )
            assert inbox.messages[0][1] == b"x" * 100_000
            await link.close()

            untrusted = _link(tls_broker.tls_address)  # the system store does not know this certificate
            with pytest.raises(LinkUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.connect()

        _run(scenario)
    finally:
        with contextlib.suppress(Exception):
            tls_broker.close()


def test_an_unacknowledged_publish_fails_after_the_timeout() -> None:
    """A broker that accepts the session and then never answers: the publish gives up, the loop runs."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def silent_broker() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)  # CONNECT
            conn.sendall(bytes([0x20, 0x03, 0x00, 0x00, 0x00]))  # CONNACK: success, no properties
            while conn.recv(65536):  # PUBLISH and the rest: never acknowledged
                pass

    threading.Thread(target=silent_broker, daemon=True).start()

    async def scenario() -> None:
        link = _link(MqttAddress("127.0.0.1", port), timeout_s=0.3)
        await link.connect()
        with pytest.raises(LinkUnavailable, match=r"no answer within 0\.3 s"):
            await link.publish(Message("policycast/v1/state/a-1", b"x", qos=1))
        assert link._acks == {}  # nothing left waiting
        link.abort()

    try:
        _run(scenario)
    finally:
        server.close()
