"""MqttLink against a real Mosquitto: acknowledgements, refusals, timeouts, will, sessions, TLS."""

from __future__ import annotations

import asyncio
import contextlib
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
from tests.agent_stub.conftest import wait_until
from tests.agent_stub.mosquitto import Mosquitto, self_signed_certificate
from tests.support.processes import free_port

T = TypeVar("T")
STATE = "policycast/v1/agents/a-1/state"


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


def _run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def test_publish_subscribe_and_a_retained_message_for_a_late_joiner(broker: Mosquitto) -> None:
    inbox = Inbox()

    async def scenario() -> None:
        publisher, subscriber = _link(broker.address), _link(broker.address, inbox)
        assert await publisher.connect() is False and publisher.connected
        await publisher.publish(Message("policycast/v1/config/1/2", b"retained", qos=1, retain=True))
        await subscriber.connect()
        assert await subscriber.subscribe("policycast/v1/config/1/+", qos=1) == 1
        await wait_until(lambda: inbox.payloads("policycast/v1/config/1/2") == [b"retained"])
        await publisher.publish(Message("policycast/v1/config/1/2", b"live", qos=1))
        await publisher.publish(Message("policycast/v1/config/1/2", b"qos0", qos=0))
        await wait_until(lambda: len(inbox.messages) == 3)
        await subscriber.unsubscribe("policycast/v1/config/1/+")
        await publisher.publish(Message("policycast/v1/config/1/2", b"after", qos=1))
        await asyncio.sleep(0.1)
        assert [p for _, p in inbox.messages] == [b"retained", b"live", b"qos0"]
        await publisher.close()
        await subscriber.close()
        assert not publisher.connected and publisher.disconnected.is_set()

    _run(scenario)


def test_a_received_message_is_the_message_type_with_its_qos_and_retain_flag(broker: Mosquitto) -> None:
    inbox = Inbox()
    topic = "policycast/v1/config/5/6"

    async def scenario() -> None:
        publisher, subscriber = _link(broker.address), _link(broker.address, inbox)
        await publisher.connect()
        await publisher.publish(Message(topic, b"retained", qos=1, retain=True))
        await subscriber.connect()
        await subscriber.subscribe(topic, qos=1)
        await wait_until(lambda: len(inbox.received) == 1)
        await publisher.publish(Message(topic, b"live", qos=1))
        await publisher.publish(Message(topic, b"qos0", qos=0))
        await wait_until(lambda: len(inbox.received) == 3)
        await publisher.close()
        await subscriber.close()

    _run(scenario)
    assert inbox.received == [
        Message(topic, b"retained", qos=1, retain=True),  # sent to a new subscription: retained
        Message(topic, b"live", qos=1, retain=False),
        Message(topic, b"qos0", qos=0, retain=False),
    ]


def test_refusals_carry_the_reason_code(broker: Mosquitto) -> None:
    async def scenario() -> None:
        link = _link(broker.address)
        await link.connect()
        with pytest.raises(LinkRefused) as refused:
            await link.publish(Message("forbidden/topic", b"x", qos=1))  # outside the listener's ACL
        assert (refused.value.reason_code, refused.value.reason) == (0x87, "Not authorized")
        assert link.connected  # a refused publication does not end the session
        await link.close()

        locked = _link(broker.locked_address, username="nobody", password="wrong")
        with pytest.raises(LinkRefused) as refused:
            await locked.connect()
        assert refused.value.operation == "connect" and refused.value.reason_code >= 0x80
        assert not locked.connected

    _run(scenario)


def test_operations_without_a_connection_fail_at_once(broker: Mosquitto) -> None:
    async def scenario() -> None:
        link = _link(broker.address)
        with pytest.raises(LinkDisconnected):
            await link.subscribe("policycast/x")
        with pytest.raises(LinkDisconnected):
            await link.publish(Message("policycast/x", b"x"))
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
                    await asyncio.sleep(0.01)
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


def test_the_will_is_published_on_abort_and_not_on_close(broker: Mosquitto) -> None:
    inbox = Inbox()

    async def scenario() -> None:
        observer = _link(broker.address, inbox)
        await observer.connect()
        await observer.subscribe(STATE)
        agent = _link(
            broker.address,
            client_id="a-1",
            will=Message(STATE, b"offline", qos=1, retain=True),
            session_expiry_s=60,
        )
        await agent.connect()
        await agent.publish(Message(STATE, b"online", retain=True))
        await wait_until(lambda: inbox.payloads(STATE) == [b"online"])

        agent.abort()  # as a crash: no DISCONNECT
        assert not agent.connected and agent.disconnected.is_set()
        await wait_until(lambda: inbox.payloads(STATE) == [b"online", b"offline"])

        assert await agent.connect() is True  # the broker kept the session
        await agent.close()
        await asyncio.sleep(0.2)
        assert inbox.payloads(STATE) == [b"online", b"offline"]  # a clean close sends no will
        await observer.close()

    _run(scenario)


def test_a_persistent_session_queues_messages_until_it_is_ended(broker: Mosquitto) -> None:
    inbox = Inbox()
    topic = "policycast/v1/agents/a-1/cmd"

    async def scenario() -> None:
        publisher = _link(broker.address)
        await publisher.connect()
        agent = _link(broker.address, inbox, client_id="a-1", session_expiry_s=60)
        await agent.connect()
        await agent.subscribe(topic)
        await agent.close()  # the session stays
        await publisher.publish(Message(topic, b"while away", qos=1))
        assert await agent.connect() is True
        await wait_until(lambda: inbox.payloads(topic) == [b"while away"])

        await agent.close(end_session=True)
        await publisher.publish(Message(topic, b"lost", qos=1))
        assert await agent.connect() is False  # a fresh session: nothing queued, nothing subscribed
        await asyncio.sleep(0.1)
        assert inbox.payloads(topic) == [b"while away"]
        await agent.close()
        await publisher.close()

    _run(scenario)


def test_a_stopped_broker_disconnects_and_fails_waiting_operations(broker: Mosquitto) -> None:
    async def scenario() -> None:
        link = _link(broker.address)
        await link.connect()
        broker.stop()
        await asyncio.wait_for(link.disconnected.wait(), timeout=5)
        assert not link.connected
        with pytest.raises(LinkDisconnected):
            await link.subscribe("policycast/x")
        with pytest.raises(LinkUnavailable):
            await link.connect()
        broker.start()
        await link.connect()
        assert link.connected
        await link.close()

    _run(scenario)


def test_tls_handshake_through_the_loop(tmp_path: Path) -> None:
    workdir = tmp_path / "tls-broker"
    workdir.mkdir()
    cert, key = self_signed_certificate(workdir)
    tls_broker = Mosquitto(workdir, tls=(cert, key)).start()
    inbox = Inbox()
    try:

        async def scenario() -> None:
            context = ssl.create_default_context(cafile=str(cert))
            link = _link(tls_broker.address, inbox, ssl_context=context)
            await link.connect()
            await link.subscribe("policycast/tls")
            await link.publish(Message("policycast/tls", b"x" * 100_000, qos=1))  # spans many TLS records
            await wait_until(lambda: len(inbox.messages) == 1)
            assert inbox.messages[0][1] == b"x" * 100_000
            await link.close()

            untrusted = _link(tls_broker.address)  # the system store does not know this certificate
            with pytest.raises(LinkUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.connect()

        _run(scenario)
    finally:
        with contextlib.suppress(Exception):
            tls_broker.stop()


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
