"""Fakes for the agent's transports: a scripted MQTT link and scripted managers for heartbeats."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent_stub.errors import LinkRefused, LinkUnavailable, ManagerRejected, ManagerUnreachable
from agent_stub.mqtt_link import LinkOptions, Message, MessageHandler
from fabric_core.topics import cmd_topic, config_topic, state_topic
from fabric_core.wire import HeartbeatRequest, HeartbeatResponse, LogEntry, MqttCredentials
from tests.agent_stub.conftest import GROUP_ID, LOCATION_ID

PREFIX = "policycast"
CMD = cmd_topic(PREFIX, "agent-1")
STATE = state_topic(PREFIX, "agent-1")
HELD = config_topic(PREFIX, GROUP_ID, LOCATION_ID)


class Broker:
    """Scripts the fake links: failures to inject, and what every link did, in order."""

    def __init__(self) -> None:
        self.links: list[FakeLink] = []
        self.calls: list[tuple[Any, ...]] = []
        self.connect_failures: list[Exception] = []
        self.refused_topics: set[str] = set()
        self.subscribed_qos: list[tuple[str, int]] = []
        """(topic, QoS asked) of every subscription, in order."""
        self.connected_with: list[str | None] = []
        """The password of every successful connect, in order."""
        self.session_present = False
        self.fails_over = False
        """What every link says of its next connect (`Link.fails_over`): True, another node is untried."""

    def factory(self, options: LinkOptions, on_message: MessageHandler) -> FakeLink:
        link = FakeLink(self, options, on_message)
        self.links.append(link)
        return link

    @property
    def link(self) -> FakeLink:
        return self.links[-1]

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]

    def states(self) -> list[dict[str, Any]]:
        return [orjson.loads(call[2]) for call in self.named("publish") if call[1] == STATE]


class FakeLink:
    def __init__(self, broker: Broker, options: LinkOptions, on_message: MessageHandler) -> None:
        self.broker = broker
        self.options = options
        self.on_message = on_message
        self._connected = False
        self._disconnected = asyncio.Event()
        self._disconnected.set()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def disconnected(self) -> asyncio.Event:
        return self._disconnected

    @property
    def fails_over(self) -> bool:
        return self.broker.fails_over

    async def connect(self) -> bool:
        self.broker.calls.append(("connect",))
        if self.broker.connect_failures:
            raise self.broker.connect_failures.pop(0)
        self.broker.connected_with.append(self.options.password)
        self._connected = True
        self._disconnected.clear()
        return self.broker.session_present

    async def subscribe(self, topic: str, qos: int = 1) -> int:
        self._require()
        self.broker.calls.append(("subscribe", topic))
        self.broker.subscribed_qos.append((topic, qos))
        if topic in self.broker.refused_topics:
            raise LinkRefused(f"subscribe to {topic}", ReasonCode(PacketTypes.SUBACK, "Not authorized"))
        return qos

    async def unsubscribe(self, topic: str) -> None:
        self._require()
        self.broker.calls.append(("unsubscribe", topic))

    async def publish(self, message: Message) -> None:
        self._require()
        self.broker.calls.append(("publish", message.topic, message.payload, message.qos, message.retain))

    async def close(self, *, end_session: bool = False) -> None:
        self.broker.calls.append(("close", end_session))
        self.drop()

    def abort(self) -> None:
        self.broker.calls.append(("abort",))
        self.drop()

    def drop(self) -> None:
        self._connected = False
        self._disconnected.set()

    def deliver(self, topic: str, payload: bytes | str) -> None:
        self.on_message(Message(topic, payload.encode() if isinstance(payload, str) else payload))

    def _require(self) -> None:
        if not self._connected:
            raise LinkUnavailable("not connected")


class FakeManager:
    """Answers heartbeats with `envelope` while the agent holds an older serial; records requests.

    `credentials`: new broker credentials, answered (`mqtt`) once, to the next heartbeat that reports an
    expiry (`mqtt_expires_at`), as the manager renews a NATS JWT."""

    def __init__(self, envelope: bytes | None = None, *, next_heartbeat_s: int = 3600) -> None:
        self.envelope = envelope
        self.next_heartbeat_s = next_heartbeat_s
        self.requests: list[HeartbeatRequest] = []
        self.credentials: MqttCredentials | None = None

    @property
    def serial(self) -> int:
        return int(orjson.loads(self.envelope)["doc"]["serial"]) if self.envelope else 0

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        self.requests.append(request)
        changed = self.envelope is not None and request.serial < self.serial
        mqtt = None
        if self.credentials is not None and request.mqtt_expires_at is not None:
            mqtt, self.credentials = self.credentials.model_dump(mode="json"), None
        return HeartbeatResponse.model_validate(
            {
                "changed": changed,
                "serial": self.serial,
                "next_heartbeat_s": self.next_heartbeat_s,
                "config": orjson.loads(self.envelope) if changed and self.envelope else None,
                "mqtt": mqtt,
            }
        )


class StoringManager(FakeManager):
    """Stores log batches once per id, like the manager; can lose answers or refuse big batches."""

    def __init__(self, envelope: bytes | None = None, *, next_heartbeat_s: int = 3600) -> None:
        super().__init__(envelope, next_heartbeat_s=next_heartbeat_s)
        self.stored: dict[str, list[str]] = {}
        self.lose_answers = 0
        self.unreachable = 0
        self.max_entries: int | None = None

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        if self.unreachable:
            self.unreachable -= 1
            self.requests.append(request)
            raise ManagerUnreachable("connection refused")
        logs = request.logs
        if logs is not None and self.max_entries is not None and len(logs.entries) > self.max_entries:
            self.requests.append(request)
            raise ManagerRejected(413, "log batch too large")
        if logs is not None:
            self.stored.setdefault(logs.batch_id, [entry.message for entry in logs.entries])
        response = await super().heartbeat(request)
        if self.lose_answers:
            self.lose_answers -= 1
            raise ManagerUnreachable("read timed out")  # stored, but the agent never hears so
        return response

    def messages(self) -> list[str]:
        return [m for batch in self.stored.values() for m in batch]

    def uploaded(self) -> list[LogEntry]:
        """Every entry that reached the manager, each batch counted once (as the manager stores it)."""
        batches = {r.logs.batch_id: r.logs.entries for r in self.requests if r.logs is not None}
        return [entry for entries in batches.values() for entry in entries]
