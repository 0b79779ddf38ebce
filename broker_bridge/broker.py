"""`BrokerLink`: the bridge's one MQTT connection to the broker, which it keeps up by itself.

It speaks plain MQTT 5 (Mosquitto), or MQTT 3.1.1 on a clean session without properties when the
engine says so (`protocol="3.1.1"`: NATS). Given several addresses (a cluster's nodes) it connects to
one and, when that fails, tries the next; what is particular to an engine (Mosquitto's dynamic-security
control topic, say) is built on top of it in that engine's modules. Errors: `broker_bridge.errors`.

Delivery: `publish` returns only once the broker acknowledged the message (PUBACK). Each TCP connection
gets its own paho client, thrown away when the connection drops, so a message that was not acknowledged
fails its caller with `BrokerUnavailable` and is never sent later behind the caller's back: what the
caller retries is the only copy (an older retained document cannot overwrite a newer one long after).

Threads: paho runs each connection's network loop in its own thread, and message handlers run on it (keep
them short). A supervisor thread opens connections, restores subscriptions and backs off between attempts
with exponential back-off and full jitter, so that bridges do not reconnect in step. The ceiling is
short (`RECONNECT_MAX_S`): there is one bridge per manager replica, not one per agent, and every document
published while the broker was away waits for it (benchmark 4: with a 30 s ceiling, a 5 s outage kept a
fleet from its new serial for 11 s after the broker was back).
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker_bridge.errors import BrokerRefused, BrokerUnavailable
from fabric_core.settings import MqttAddress
from fabric_core.wire import MqttProtocol

log = logging.getLogger(__name__)

RECONNECT_MAX_S = 2.0
"""The longest wait between connection attempts (full jitter below it)."""

Handler = Callable[[str, bytes], None]

_CONNACK_TIMEOUT_S = 10.0
_MAX_INFLIGHT = 100
"""Our own cap on unacknowledged publications; lowered to the broker's Receive Maximum if smaller."""
_FATAL_CONNACK = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})
"""Refusals that repeating the same CONNECT cannot fix: bad protocol, client id, credentials, banned.
Others (server busy or unavailable, quota, connection rate) are worth retrying. (paho reports MQTT
3.1.1's return codes 1, 2, 4 and 5 as these.)"""
_STABLE_CONNECTION_S = 30.0
"""A connection that lasted this long resets the back-off; one dropped sooner keeps it growing."""


@dataclass(frozen=True, slots=True)
class Publication:
    """One message the bridge publishes: a document, a command, a cleared state, a control request."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class _Acks:
    """Answers (PUBACK, SUBACK, UNSUBACK) by message id on one connection, awaited by caller threads.

    Answers are recorded even before anyone waits (the broker may answer before `publish` returns the
    message id). An id whose caller gave up is "abandoned": its late answer is dropped, so that paho can
    reuse the id for a new message without the old answer being taken for the new one's.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._answers: dict[int, Any] = {}
        self._abandoned: set[int] = set()
        self._closed = False

    def record(self, mid: int, answer: Any) -> None:
        with self._cond:
            if mid in self._abandoned:
                self._abandoned.discard(mid)
                return
            self._answers[mid] = answer
            self._cond.notify_all()

    def close(self) -> None:
        """The connection is gone: no answer will come; wake every waiter."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(self, mids: list[int], deadline: float, what: str) -> list[Any]:
        """The answers to `mids`, in order; `BrokerUnavailable` if the connection ends or time runs out."""
        with self._cond:
            while True:
                if all(mid in self._answers for mid in mids):
                    return [self._answers.pop(mid) for mid in mids]
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    self._abandon(mids)
                    cause = "the connection was lost" if self._closed else "timed out"
                    raise BrokerUnavailable(f"{what}: {cause} before the broker acknowledged")
                self._cond.wait(remaining)

    def _abandon(self, mids: list[int]) -> None:
        for mid in mids:
            if self._answers.pop(mid, None) is None:
                self._abandoned.add(mid)


@dataclass(eq=False)
class _Connection:
    """One paho client and one TCP connection; thrown away when the connection ends."""

    client: mqtt.Client
    acks: _Acks = field(default_factory=_Acks)
    connack: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    refusal: ReasonCode | None = None
    too_many_inflight: bool = False
    up_since: float = 0.0


class BrokerLink:
    """One MQTT connection to the broker (or to one node of a cluster), reconnecting by itself.

    `connected` is set while the link is up and every subscription has been restored.
    """

    def __init__(
        self,
        address: MqttAddress | Sequence[MqttAddress],
        *,
        username: str,
        password: str,
        client_id: str,
        keepalive: int = 60,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = RECONNECT_MAX_S,
        ssl_context: ssl.SSLContext | None = None,
        protocol: MqttProtocol = "5",
    ) -> None:
        """`address`: the broker, or every node of a cluster (tried in turn, starting at a random
        one, so that bridges spread over the nodes). `ssl_context`: what an `mqtts://` address is
        verified with (the bridge passes one that trusts only the manager's CA); None: the system's
        default trust. `protocol`: "5", or "3.1.1" (clean session, no MQTT 5 properties)."""
        addresses = [address] if isinstance(address, MqttAddress) else list(address)
        if not addresses:
            raise ValueError("a broker link needs an address")
        self.addresses = addresses
        self._next_address = random.randrange(len(addresses))
        self.address = addresses[self._next_address]
        """The node this link is connected to, or tries next."""
        self.protocol = protocol
        self._ssl_context = ssl_context
        self.client_id = client_id
        self.connected = threading.Event()
        self.sessions = 0
        """How many connections came up so far: a change tells users the broker may have restarted."""
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._lock = threading.Lock()  # guards _current, _subscriptions and _started
        self._current: _Connection | None = None
        self._subscriptions: dict[str, tuple[Handler, int]] = {}
        self._started = False
        self._closing = threading.Event()
        self._refused: BrokerRefused | None = None
        """Set once every node refused the credentials before the link was ever up: it gives up."""
        self._refused_by: set[str] = set()
        """The nodes that refused the credentials since the link was last up. A cluster's node can
        refuse an account it has not loaded yet for a moment after the cluster formed, so one node's
        refusal sends the link to the next one; only every node's is final."""
        self._last_failure: str | None = None
        """Why the last attempt to connect failed (for the error `connect` raises)."""
        self._supervisor: threading.Thread | None = None
        self._was_connected = False
        self._inflight = _MAX_INFLIGHT

    def __enter__(self) -> BrokerLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connecting ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background (idempotent); `connected` tells when the link is up."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._supervisor.start()

    def wait_connected(self, deadline: float) -> None:
        """Return once the link is up; `BrokerUnavailable` if it is not by `deadline` (monotonic)."""
        self._wait_connection(deadline)

    def connect(self, timeout: float = 10.0) -> None:
        """Start the link and wait until it is up.

        Raises `BrokerRefused` (and gives up) when every node of the broker rejects the credentials, and
        `BrokerUnavailable` when it is not up within `timeout`; the link then keeps trying in the
        background until `close()`.
        """
        self.start()
        deadline = time.monotonic() + timeout
        while not self.connected.wait(0.02):
            if self._refused is not None:
                self.close()
                raise self._refused
            if time.monotonic() > deadline:
                why = f" (last: {self._last_failure})" if self._last_failure else ""
                raise BrokerUnavailable(f"no connection to {self.address.url} within {timeout:.1f}s{why}")

    def close(self) -> None:
        """Disconnect and stop reconnecting. Calls waiting for acknowledgements fail at once."""
        self._closing.set()
        with self._lock:
            current = self._current
        if current is not None:
            current.client.disconnect()
            current.ended.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=10)
        self.connected.clear()

    def _supervise(self) -> None:
        failures = 0
        while not self._closing.is_set():
            connection = self._open()
            if connection is not None:
                self._serve(connection)
                lasted = time.monotonic() - connection.up_since
                failures = 0 if lasted >= _STABLE_CONNECTION_S else failures + 1
            else:
                failures += 1
            if self._refused is not None and not self._was_connected:
                return  # e.g. bad credentials at the first attempt: connect() reports it and closes
            delay = self._backoff(failures)
            log.debug("reconnecting to %s in %.2fs", self.address.url, delay)
            self._closing.wait(delay)

    def _backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, min * 2**failures)]."""
        ceiling = min(self._reconnect_max_s, self._reconnect_min_s * (2 ** min(failures, 30)))
        return random.uniform(0, ceiling)

    def _open(self) -> _Connection | None:
        """A connection that the broker accepted (CONNACK success), or None (the next attempt goes to
        the next address)."""
        connection = self._attempt()
        if connection is None and len(self.addresses) > 1:
            self._next_address = (self._next_address + 1) % len(self.addresses)
            self.address = self.addresses[self._next_address]
        return connection

    def _attempt(self) -> _Connection | None:
        connection = _Connection(self._new_client())
        connection.client.user_data_set(connection)
        try:
            if self.protocol == "5":
                connection.client.connect(
                    self.address.host, self.address.port, keepalive=self._keepalive, clean_start=True
                )
            else:  # 3.1.1: the session is clean by construction (`_new_client`)
                connection.client.connect(self.address.host, self.address.port, keepalive=self._keepalive)
        except OSError as exc:  # refused, unreachable, or a certificate its CA did not issue (ssl.SSLError)
            self._last_failure = str(exc)
            log.warning("cannot reach the broker at %s: %s", self.address.url, exc)
            return None
        connection.client.loop_start()
        deadline = time.monotonic() + _CONNACK_TIMEOUT_S
        while not connection.connack.wait(0.05) and time.monotonic() < deadline:
            if self._closing.is_set():
                break
        if connection.connack.is_set() and connection.refusal is None:
            if not connection.too_many_inflight:
                return connection
            log.info("the broker takes %d unacknowledged messages at most: reconnecting", self._inflight)
        self._teardown(connection)
        refusal = connection.refusal
        if refusal is not None:
            message = f"the broker at {self.address.url} refused {self._username!r}: {refusal}"
            if refusal.value in _FATAL_CONNACK:
                self._refused_by.add(self.address.url)
                if len(self._refused_by) >= len(self.addresses):
                    self._refused = BrokerRefused(message, refusal.value)
            log.error("%s", message)
        elif not connection.connack.is_set():
            log.warning("no CONNACK from %s within %.0fs", self.address.url, _CONNACK_TIMEOUT_S)
        return None

    def _serve(self, connection: _Connection) -> None:
        """Restore subscriptions, mark the link up, and wait until the connection ends."""
        connection.up_since = time.monotonic()
        with self._lock:
            self._current = connection
            subscriptions = dict(self._subscriptions)
        self._refused = None
        self._refused_by.clear()
        self._was_connected = True
        log.info("connected to %s as %s", self.address.url, self.client_id)
        for topic_filter, (_, qos) in subscriptions.items():
            try:
                self._subscribe_on(connection, topic_filter, qos, timeout=_CONNACK_TIMEOUT_S)
            except BrokerRefused as exc:
                log.error("subscription not restored: %s", exc)
            except BrokerUnavailable:
                connection.client.disconnect()  # no SUBACK: start over on a fresh connection
                break
        if not connection.ended.is_set():
            self.sessions += 1
            self.connected.set()
        while not connection.ended.wait(1.0):
            if self._closing.is_set():
                break
        self.connected.clear()
        with self._lock:
            if self._current is connection:
                self._current = None
        self._teardown(connection)

    def _teardown(self, connection: _Connection) -> None:
        connection.acks.close()
        connection.client.disconnect()
        connection.client.loop_stop()

    def _new_client(self) -> mqtt.Client:
        v5 = self.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
            # One client per connection: the supervisor reconnects with a fresh one, so that messages
            # left unacknowledged by a dead connection are never replayed by paho later.
            reconnect_on_failure=False,
        )
        client.username_pw_set(self._username, self._password)
        if self.address.tls:
            client.tls_set_context(self._ssl_context or ssl.create_default_context())
        client.max_inflight_messages_set(self._inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # --- paho callbacks (network thread) ----------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        connection = client.user_data_get()
        if reason.is_failure:
            connection.refusal = reason
        elif properties is not None and hasattr(properties, "ReceiveMaximum"):
            # More unacknowledged messages than the broker's Receive Maximum (Mosquitto:
            # max_inflight_messages) is a protocol error that gets the connection closed. paho cannot
            # lower its cap on an open connection: the next connection's client is built with it.
            receive_maximum = int(properties.ReceiveMaximum)
            if receive_maximum < self._inflight:
                self._inflight = receive_maximum
                connection.too_many_inflight = True
        connection.connack.set()

    def _on_disconnect(
        self, client: mqtt.Client, _: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        connection = client.user_data_get()
        self.connected.clear()
        connection.acks.close()
        connection.ended.set()
        if connection.connack.is_set() and not self._closing.is_set():
            log.warning("lost the connection to %s: %s", self.address.url, reason)
        connection.connack.set()  # a connection closed before CONNACK: stop waiting for it

    def _on_publish(
        self, client: mqtt.Client, _: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        client.user_data_get().acks.record(mid, reason)

    def _on_subscribe(
        self, client: mqtt.Client, _: Any, mid: int, reasons: list[ReasonCode], properties: Properties | None
    ) -> None:
        client.user_data_get().acks.record(mid, reasons)

    def _on_message(self, client: mqtt.Client, _: Any, message: mqtt.MQTTMessage) -> None:
        topic, payload = message.topic, bytes(message.payload)
        with self._lock:
            handlers = [h for f, (h, _q) in self._subscriptions.items() if mqtt.topic_matches_sub(f, topic)]
        for handler in handlers:
            try:
                handler(topic, payload)
            except Exception:
                log.exception("handler %r failed on a message on %s", handler, topic)

    # --- publishing ---------------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """Publish and return once the broker acknowledged (QoS 1, 2) or took the message (QoS 0).

        Waits up to `timeout` for a connection too. Raises `BrokerUnavailable` when not acknowledged in
        time or the connection drops, `BrokerRefused` when the broker answers with a failure reason
        (e.g. 0x87 not authorised).
        """
        self.publish_many([Publication(topic, payload, qos, retain)], timeout=timeout)

    def publish_many(self, messages: Iterable[Publication], *, timeout: float = 30.0) -> None:
        """Publish every message (all in flight at once) and return once all are acknowledged.

        All or error: on `BrokerUnavailable` some may have been delivered; retrying the batch repeats
        them (harmless for retained documents and serial-checked commands).
        """
        batch = list(messages)
        if not batch:
            return
        deadline = time.monotonic() + timeout
        connection = self._wait_connection(deadline)
        mids = [self._send(connection, item) for item in batch]
        acked = [(item, mid) for item, mid in zip(batch, mids, strict=True) if item.qos > 0]
        what = f"publish of {len(batch)} message(s) to {batch[0].topic}{' ...' if len(batch) > 1 else ''}"
        answers = connection.acks.wait([mid for _, mid in acked], deadline, what)
        refused = [(item, a) for (item, _), a in zip(acked, answers, strict=True) if a.is_failure]
        if refused:
            item, reason = refused[0]
            raise BrokerRefused(
                f"the broker refused {len(refused)} of {len(batch)} publication(s), "
                f"e.g. to {item.topic}: {reason}",
                reason.value,
            )

    def _wait_connection(self, deadline: float) -> _Connection:
        if self._closing.is_set():
            raise BrokerUnavailable("the broker link is closed")
        self.start()
        while True:
            with self._lock:
                current = self._current
            if current is not None and self.connected.is_set():
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing.is_set():
                raise BrokerUnavailable(f"not connected to the broker at {self.address.url}")
            self.connected.wait(min(remaining, 0.05))

    def _send(self, connection: _Connection, item: Publication) -> int:
        info = connection.client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # The client is dead (it never reconnects): the message stays in it and is never sent.
            raise BrokerUnavailable(f"publish to {item.topic}: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    # --- subscribing --------------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, *, timeout: float = 10.0) -> None:
        """Call `handler(topic, payload)` for messages matching `topic_filter`, across reconnects.

        When connected, waits for the SUBACK and raises `BrokerRefused` if the broker refuses (the
        subscription is then forgotten). When not (or the connection drops meanwhile), the subscription
        is made as soon as the link is up, before `connected` is set.
        """
        with self._lock:
            self._subscriptions[topic_filter] = (handler, qos)
            # A connection is current only once the supervisor took its snapshot of the subscriptions
            # to restore: from then on, new ones are made here.
            current = self._current
        if current is None:
            return
        try:
            self._subscribe_on(current, topic_filter, qos, timeout=timeout)
        except BrokerRefused:
            with self._lock:
                self._subscriptions.pop(topic_filter, None)
            raise
        except BrokerUnavailable as exc:
            log.info("%s; it will be made on the next connection", exc)

    def unsubscribe(self, topic_filter: str, *, timeout: float = 10.0) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
            current = self._current
        if current is None or not self.connected.is_set():
            return
        rc, mid = current.client.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected: the subscription ends with this connection anyway
        current.acks.wait([mid], time.monotonic() + timeout, f"unsubscribe from {topic_filter}")

    def _subscribe_on(self, connection: _Connection, topic_filter: str, qos: int, *, timeout: float) -> None:
        if self.protocol == "5":
            rc, mid = connection.client.subscribe(topic_filter, options=SubscribeOptions(qos=qos))
        else:
            rc, mid = connection.client.subscribe(topic_filter, qos=qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnavailable(f"subscribe to {topic_filter}: {mqtt.error_string(rc)}")
        (reasons,) = connection.acks.wait([mid], time.monotonic() + timeout, f"subscribe to {topic_filter}")
        if reasons[0].is_failure:
            raise BrokerRefused(
                f"the broker refused the subscription to {topic_filter}: {reasons[0]}", reasons[0].value
            )
