"""Fakes for the agent's transports: a scripted MQTT link and a scripted manager for heartbeats."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent_stub.errors import LinkRefused, LinkUnavailable
from agent_stub.mqtt_link import LinkOptions, MessageHandler
from fabric_core.topics import cmd_topic, config_topic, state_topic
from fabric_core.wire import HeartbeatRequest, HeartbeatResponse
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
        self.session_present = False

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

    async def connect(self) -> bool:
        self.broker.calls.append(("connect",))
        if self.broker.connect_failures:
            raise self.broker.connect_failures.pop(0)
        self._connected = True
        self._disconnected.clear()
        return self.broker.session_present

    async def subscribe(self, topic: str, qos: int = 1) -> int:
        self._require()
        self.broker.calls.append(("subscribe", topic))
        if topic in self.broker.refused_topics:
            raise LinkRefused(f"subscribe to {topic}", ReasonCode(PacketTypes.SUBACK, "Not authorized"))
        return qos

    async def unsubscribe(self, topic: str) -> None:
        self._require()
        self.broker.calls.append(("unsubscribe", topic))

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._require()
        self.broker.calls.append(("publish", topic, payload, qos, retain))

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
        self.on_message(topic, payload.encode() if isinstance(payload, str) else payload)

    def _require(self) -> None:
        if not self._connected:
            raise LinkUnavailable("not connected")


class FakeManager:
    """Answers heartbeats with `envelope` while the agent holds an older serial; records requests."""

    def __init__(self, envelope: bytes | None = None, *, next_heartbeat_s: int = 3600) -> None:
        self.envelope = envelope
        self.next_heartbeat_s = next_heartbeat_s
        self.requests: list[HeartbeatRequest] = []

    @property
    def serial(self) -> int:
        return int(orjson.loads(self.envelope)["doc"]["serial"]) if self.envelope else 0

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        self.requests.append(request)
        changed = self.envelope is not None and request.serial < self.serial
        return HeartbeatResponse.model_validate(
            {
                "changed": changed,
                "serial": self.serial,
                "next_heartbeat_s": self.next_heartbeat_s,
                "config": orjson.loads(self.envelope) if changed and self.envelope else None,
            }
        )
