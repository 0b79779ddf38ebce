"""The agent's one module that talks to an MQTT broker: a paho-mqtt client driven by the asyncio loop.

Thousands of agents share one event loop in the fleet simulator, so a link owns no thread: paho runs in
its "external loop" mode, like paho's own asyncio example. Its socket callbacks register the socket
with the loop (`add_reader` calls `loop_read`, `add_writer` calls `loop_write` while paho has bytes to
send), and a timer calls `loop_misc` for keep-alive pings. `loop_start()`/`loop_forever()` are never used.

Connecting without blocking the loop: paho's `connect()`/`reconnect()` open the TCP connection with a
blocking `socket.create_connection` (up to its connect timeout against a silent host, times every agent
in the loop). So this module opens the connection itself with `loop.sock_connect` (and, for `mqtts://`,
a non-blocking TLS handshake), then hands the connected socket to paho, whose `reconnect()` takes it from
the one overridden method `_create_socket` and sends CONNECT over it. That method is private, so its
presence is checked at import: a paho release that drops it fails loudly here, not by blocking.

Every operation waits for the broker's answer (CONNACK, SUBACK, UNSUBACK, PUBACK) and raises the
`LinkError` branch of `agent_stub.errors`: `LinkUnavailable` (transient: the broker cannot be reached or
did not answer in time; `LinkDisconnected` when there is no connection or it dropped meanwhile) or
`LinkRefused` (the broker answered with a failure reason code).

Two protocol versions (`LinkOptions.protocol`, from the broker engine's `MqttDelivery.protocol`): MQTT 5
(Mosquitto) and MQTT 3.1.1 (NATS, which refuses an MQTT 5 CONNECT). Over 3.1.1 the session is chosen by
the clean-session flag (`clean_start`), no properties are sent (no session expiry: a persistent 3.1.1
session lasts until a clean connect ends it), and the 3.1.1 return codes land on the same errors: paho
maps a CONNACK refusal (4 bad user name or password, 5 not authorised) to the MQTT 5 reason (0x86,
0x87), a SUBACK 0x80 is a failure as in MQTT 5, and an UNSUBACK or PUBACK carries no code (success).

A broker may have several nodes (`LinkOptions.addresses`): every connect picks one
(`agent_stub.node_choice`, with the agent's `LinkOptions.rng`) so that the agents of a dead node spread
over the live ones. `fails_over` tells the caller that a node failed and another has not since the last
good session: the push loop fails over to it at once (with jitter), and backs off only when none is
left. Each node is verified with the same `ssl_context` and its own host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent_stub.errors import LinkDisconnected, LinkError, LinkRefused, LinkUnavailable
from agent_stub.link import Link, LinkFactory, LinkOptions, Message, MessageHandler
from agent_stub.node_choice import UNANSWERED, UNREACHABLE, NodeChoice
from fabric_core.settings import MqttAddress

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

__all__ = ["Link", "LinkFactory", "LinkOptions", "Message", "MessageHandler", "MqttLink"]
"""What a broker connection is (`agent_stub.link`) is imported from here too, beside its implementation."""

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")

if not callable(getattr(mqtt.Client, "_create_socket", None)):  # pragma: no cover - a paho upgrade
    raise ImportError("paho-mqtt no longer has Client._create_socket: agent_stub.mqtt_link must be adapted")


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves __init__ untyped


class _HandoffClient(mqtt.Client):
    """paho's client, fed a socket this module connected without blocking the event loop."""

    handoff: SocketLike | None = None

    def _create_socket(self) -> SocketLike:
        sock, self.handoff = self.handoff, None
        if sock is None:
            raise ConnectionError("no connected socket was handed over")
        return sock


class MqttLink:
    """One MQTT 5 (or 3.1.1) client connection, driven by the running asyncio loop (no thread)."""

    def __init__(self, options: LinkOptions, on_message: MessageHandler) -> None:
        self.options = options
        self._on_message = on_message
        self._address = options.address
        """The node of the current (or last) connection."""
        self._nodes = NodeChoice(options.nodes, options.rng)
        self._reached = False
        """The current connect got its TCP connection (a failure from then on is the session's)."""
        self._closing = False
        """This side ends the connection (`close`, `abort`): not the node's failure."""
        self._client = self._make_client()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = False
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self.session_present = False
        self._connack: asyncio.Future[bool] | None = None
        self._acks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._misc: asyncio.TimerHandle | None = None
        # Keep-alive needs a tick well within the interval; a tenth keeps pings timely and cheap.
        self._misc_s = min(5.0, max(0.5, options.keepalive_s / 10))

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def disconnected(self) -> asyncio.Event:
        return self._disconnected

    @property
    def address(self) -> MqttAddress:
        """The broker node of the current connection (or of the last attempt)."""
        return self._address

    @property
    def untried(self) -> int:
        """Broker nodes that have not failed (nor dropped the session) since the last good connect."""
        return self._nodes.untried

    @property
    def fails_over(self) -> bool:
        return self._nodes.fails_over

    # --- operations --------------------------------------------------------------------------------

    async def connect(self) -> bool:
        """Connect and wait for CONNACK; returns whether the broker resumed an existing session."""
        if self._connected:
            return self.session_present
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._reached = False
        address = self._address = self._nodes.pick(self._address)
        try:
            async with asyncio.timeout(self.options.timeout_s):
                sock = await self._open_socket(address)
                self._connack = self._loop.create_future()
                self._start_session(sock, address)
                self.session_present = await self._connack
        except TimeoutError:
            self._strike(address)
            self.abort()
            raise LinkUnavailable(
                f"{address.url} did not accept a session within {self.options.timeout_s:g} s"
            ) from None
        except OSError as exc:
            self._strike(address)
            self.abort()
            raise LinkUnavailable(f"cannot connect to {address.url}: {exc}") from exc
        except LinkError:
            self._strike(address)
            self.abort()
            raise
        except asyncio.CancelledError:
            self.abort()  # paho may hold a half-open session
            raise
        finally:
            self._connack = None
        self._nodes.succeeded()
        return self.session_present

    def _strike(self, address: MqttAddress, *, weight: int | None = None) -> None:
        """Count a failure of `address`: double if it could not even be reached."""
        if weight is None:
            weight = UNANSWERED if self._reached else UNREACHABLE
        self._nodes.strike(address, weight)

    async def subscribe(self, topic: str, qos: int = 1) -> int:
        """Subscribe and wait for SUBACK; returns the granted QoS."""
        self._require_connected(f"subscribe to {topic}")
        if self.options.mqtt5:
            rc, mid = self._client.subscribe(topic, options=SubscribeOptions(qos=qos))
        else:
            rc, mid = self._client.subscribe(topic, qos=qos)
        # 3.1.1: the granted QoS, or 0x80 for a refusal (paho reads it as MQTT 5's 0x80, a failure).
        (code,) = await self._acknowledged(f"subscribe to {topic}", rc, mid)
        if code.is_failure:
            raise LinkRefused(f"subscribe to {topic}", code)
        return code.value

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribe and wait for UNSUBACK ("no subscription existed" is not an error)."""
        self._require_connected(f"unsubscribe from {topic}")
        rc, mid = self._client.unsubscribe(topic)
        codes = await self._acknowledged(f"unsubscribe from {topic}", rc, mid)
        # 3.1.1: an UNSUBACK carries no code at all, and is a success.
        failures = [code for code in codes if code.is_failure]
        if failures:
            raise LinkRefused(f"unsubscribe from {topic}", failures[0])

    async def publish(self, message: Message) -> None:
        """Publish; with QoS 1 or 2, wait for the broker's acknowledgement."""
        topic = message.topic
        # Checked first, or paho would queue it for the next session: the caller decides what is still
        # worth sending then.
        self._require_connected(f"publish to {topic}")
        info = self._client.publish(topic, message.payload, qos=message.qos, retain=message.retain)
        if message.qos == 0:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise LinkDisconnected(f"publish to {topic}: {mqtt.error_string(info.rc)}")
            return
        codes = await self._acknowledged(f"publish to {topic}", info.rc, info.mid)
        failures = [code for code in codes if code.is_failure]
        if failures:
            raise LinkRefused(f"publish to {topic}", failures[0])

    async def close(self, *, end_session: bool = False) -> None:
        """Disconnect cleanly (the broker discards the will); `end_session` also drops the session
        (MQTT 5 only: a 3.1.1 DISCONNECT cannot, and the agents of a 3.1.1 broker use clean sessions)."""
        self._closing = True
        if self._connected:
            properties = None
            if end_session and self.options.mqtt5:
                # MQTT 5: a DISCONNECT may shorten the session's expiry; 0 ends it now.
                properties = _properties(PacketTypes.DISCONNECT)
                properties.SessionExpiryInterval = 0
            self._client.disconnect(properties=properties)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.timeout_s):
                    await self._disconnected.wait()
        self.abort()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would: the broker publishes the will."""
        self._closing = True
        sock = self._client.socket()
        if sock is None:
            self._lost("aborted")
            return
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        # paho notices the end of the stream on its next read: do it now, so that state is final on return.
        for _ in range(1000):
            if self._client.socket() is None:
                break
            if self._client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        if self._client.socket() is not None:  # pragma: no cover - paho kept reading a dead socket
            log.warning("%s: the aborted connection is still open", self.options.client_id)
        self._lost("aborted")

    # --- opening the connection --------------------------------------------------------------------

    def _make_client(self) -> _HandoffClient:
        options = self.options
        if options.mqtt5:
            client = _HandoffClient(
                CallbackAPIVersion.VERSION2, client_id=options.client_id, protocol=MQTTProtocolVersion.MQTTv5
            )
        else:
            client = _HandoffClient(
                CallbackAPIVersion.VERSION2,
                client_id=options.client_id,
                clean_session=options.clean_start,
                protocol=MQTTProtocolVersion.MQTTv311,
            )
        client.enable_logger(_paho_log)
        if options.username is not None:
            client.username_pw_set(options.username, options.password)
        if options.will is not None:
            will = options.will
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_suback
        client.on_unsubscribe = self._on_suback
        client.on_publish = self._on_puback
        client.on_message = self._on_paho_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    def _start_session(self, sock: SocketLike, address: MqttAddress) -> None:
        """Hand `sock` to paho and send CONNECT over it."""
        options = self.options
        if options.mqtt5:
            properties = _properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = options.session_expiry_s
            self._client.connect_async(
                address.host,
                address.port,
                keepalive=options.keepalive_s,
                clean_start=options.clean_start,
                properties=properties,
            )
        else:  # the clean-session flag was given to the client; 3.1.1 has no properties
            self._client.connect_async(address.host, address.port, keepalive=options.keepalive_s)
        self._client.handoff = sock
        try:
            rc = self._client.reconnect()
        finally:
            self._client.handoff = None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkDisconnected(f"cannot send CONNECT: {mqtt.error_string(rc)}")

    async def _open_socket(self, address: MqttAddress) -> SocketLike:
        """A connected, non-blocking TCP (or TLS) socket to the broker node `address`."""
        last_error: OSError | None = None
        for family, sockaddr in await self._resolve(address.host, address.port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await self._running_loop().sock_connect(sock, sockaddr)
                self._reached = True
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            except BaseException:  # cancelled (the connect timeout): do not leak the socket
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return await self._start_tls(sock, address.host) if address.tls else sock
        raise last_error or OSError(f"no address found for {address.host}")

    async def _resolve(self, host: str, port: int) -> list[tuple[int, Any]]:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            # A name: the loop resolves it in its executor, off the loop thread.
            infos = await self._running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return [(info[0], info[4]) for info in infos]
        # A literal needs no resolver round trip (the common case in tests and the simulator).
        return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]

    async def _start_tls(self, sock: socket.socket, host: str) -> ssl.SSLSocket:
        """A TLS handshake that waits for the socket through the loop instead of blocking on it."""
        context = self.options.ssl_context or ssl.create_default_context()
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    return tls
                except ssl.SSLWantReadError:
                    await self._ready(tls, write=False)
                except ssl.SSLWantWriteError:
                    await self._ready(tls, write=True)
        except BaseException:
            tls.close()
            raise

    async def _ready(self, sock: socket.socket, *, write: bool) -> None:
        loop = self._running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        (loop.add_writer if write else loop.add_reader)(sock, wake)
        try:
            await ready
        finally:
            (loop.remove_writer if write else loop.remove_reader)(sock)

    # --- waiting for acknowledgements --------------------------------------------------------------

    def _require_connected(self, operation: str) -> None:
        if not self._connected:
            raise LinkDisconnected(f"{operation}: not connected")

    async def _acknowledged(
        self, operation: str, rc: MQTTErrorCode | int, mid: int | None
    ) -> list[ReasonCode]:
        if not self._connected or rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            reason = "not connected" if not self._connected else mqtt.error_string(rc)
            raise LinkDisconnected(f"{operation}: {reason}")
        loop = self._running_loop()
        ack: asyncio.Future[list[ReasonCode]] = loop.create_future()
        self._acks[mid] = ack
        # A timer on the future rather than `asyncio.timeout()`: every publish and subscribe of a fleet
        # waits here, and the timeout context (task lookup, cancel and uncancel) cost more than the
        # wait itself when 10,000 agents reconnect at once (benchmark 4).
        expiry = loop.call_later(self.options.timeout_s, _expire, ack)
        try:
            return await ack
        except _NoAnswer:
            raise LinkUnavailable(f"{operation}: no answer within {self.options.timeout_s:g} s") from None
        finally:
            expiry.cancel()
            self._acks.pop(mid, None)

    def _resolve_ack(self, mid: int, codes: list[ReasonCode]) -> None:
        ack = self._acks.pop(mid, None)
        if ack is not None and not ack.done():
            ack.set_result(codes)

    def _lost(self, why: str) -> None:
        """The connection is gone: fail whatever waits for an answer."""
        self._connected = False
        self._disconnected.set()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(LinkUnavailable(f"the broker closed the connection ({why})"))
        acks, self._acks = self._acks, {}
        for ack in acks.values():
            if not ack.done():
                ack.set_exception(LinkDisconnected(f"connection lost ({why})"))

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # --- paho callbacks (all run on the loop thread, inside loop_read/loop_write/loop_misc) --------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        waiter = self._connack
        if reason.is_failure:
            if waiter is not None and not waiter.done():
                waiter.set_exception(LinkRefused("connect", reason))
            return
        self._connected = True
        self._disconnected.clear()
        if waiter is not None and not waiter.done():
            waiter.set_result(flags.session_present)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connected:
            level = logging.DEBUG if reason.value == 0 else logging.INFO
            log.log(level, "%s: disconnected from %s: %s", self.options.client_id, self._address.url, reason)
            if not self._closing:  # the node went away: the next connects try the others first
                self._strike(self._address, weight=UNREACHABLE)
        self._lost(str(reason))

    def _on_suback(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._resolve_ack(mid, reasons)

    def _on_puback(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._resolve_ack(mid, [reason])

    def _on_paho_message(self, client: mqtt.Client, userdata: Any, received: mqtt.MQTTMessage) -> None:
        try:
            # Inside the guard: paho decodes the topic here, and a topic that is not UTF-8 raises.
            message = Message(received.topic, bytes(received.payload), received.qos, bool(received.retain))
            self._on_message(message)
        except Exception:
            # A handler's bug must not tear down the connection (paho would re-raise into the loop).
            log.exception("%s: message handler failed", self.options.client_id)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        self._running_loop().add_reader(sock, self._readable)
        self._schedule_misc()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        loop = self._running_loop()
        loop.remove_reader(sock)
        loop.remove_writer(sock)
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        self._running_loop().add_writer(sock, self._client.loop_write)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        self._running_loop().remove_writer(sock)

    def _readable(self) -> None:
        rc = self._client.loop_read()
        # TLS may hold decrypted bytes that the socket no longer signals: drain them now.
        sock = self._client.socket()
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
            rc = self._client.loop_read()
            sock = self._client.socket()

    def _schedule_misc(self) -> None:
        if self._misc is None:
            self._misc = self._running_loop().call_later(self._misc_s, self._tick)

    def _tick(self) -> None:
        self._misc = None
        if self._client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._schedule_misc()


class _NoAnswer(LinkUnavailable):
    """The broker did not acknowledge in time (turned into `LinkUnavailable` for callers)."""


def _expire(ack: asyncio.Future[list[ReasonCode]]) -> None:
    if not ack.done():
        ack.set_exception(_NoAnswer())
