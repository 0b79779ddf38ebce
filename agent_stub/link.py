"""What a broker connection is to the agent: the options that open it, its messages, and the `Link`
protocol the push loop drives (`agent_stub.mqtt_link.MqttLink` is the implementation; tests use fakes)."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fabric_core.settings import MqttAddress
from fabric_core.wire import MqttProtocol


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT application message, the agent's only shape of one: what a link publishes, what it hands
    to its handler, and the will the broker publishes when the connection ends without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


MessageHandler = Callable[[Message], None]
"""Receives each message, inside the loop's read callback: must not block."""


@dataclass(frozen=True, slots=True)
class LinkOptions:
    """Everything a link needs to open a session; built once per agent."""

    address: MqttAddress
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive_s: int = 60
    session_expiry_s: int = 0
    """How long the broker keeps the session (subscriptions, queued QoS 1 messages) once disconnected."""
    clean_start: bool = False
    will: Message | None = None
    """Published by the broker, as it is, if the connection ends without DISCONNECT."""
    timeout_s: float = 10.0
    """Limit of the connection (TCP, TLS and CONNACK) and of each acknowledgement."""
    ssl_context: ssl.SSLContext | None = None
    """For mqtts:// addresses; default: the system's trust store, with host name checking."""
    protocol: MqttProtocol = "5"
    """"5" (Mosquitto) or "3.1.1" (NATS): clean session from `clean_start`, no properties."""
    addresses: tuple[MqttAddress, ...] = ()
    """Every node of the broker, `address` among them; empty: `address` alone."""
    rng: random.Random | None = field(default=None, compare=False, repr=False)
    """Picks the node of each connect (the agent's generator); None: a shared one."""

    @property
    def nodes(self) -> tuple[MqttAddress, ...]:
        """The broker nodes to connect to: `addresses`, else `address` alone."""
        return self.addresses or (self.address,)

    @property
    def mqtt5(self) -> bool:
        return self.protocol == "5"


class Link(Protocol):
    """What the push loop needs from a broker connection (`MqttLink`, or a fake in tests)."""

    @property
    def connected(self) -> bool: ...

    @property
    def disconnected(self) -> asyncio.Event:
        """Set while there is no connection (before the first connect and after any loss)."""
        ...

    @property
    def fails_over(self) -> bool:
        """Whether the next connect goes to another node than one that just failed: a node failed or
        dropped the session since the last good connect, and another has not failed since."""
        ...

    async def connect(self) -> bool:
        """Open the session; returns whether the broker still had it (MQTT 5 session present)."""
        ...

    async def subscribe(self, topic: str, qos: int = 1) -> int: ...

    async def unsubscribe(self, topic: str) -> None: ...

    async def publish(self, message: Message) -> None: ...

    async def close(self, *, end_session: bool = False) -> None: ...

    def abort(self) -> None: ...


LinkFactory = Callable[[LinkOptions, MessageHandler], Link]
