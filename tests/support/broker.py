"""A real Mosquitto for tests, configured by the project's own engine, on a free port.

- `Broker`: the broker process in a temporary directory, with the bridge's account: its files are
  written by `MosquittoEngine.write_config` and it runs as `local_stack.broker_process.BrokerProcess`,
  exactly as `policycast up` runs it. `link()` gives a connected `BrokerLink` as the bridge,
  `provision()` makes an agent account (the control API, as the bridge does), `provision_many()` many
  at once (written into the broker's file, as `broker-config --with-agents` does),
  `stop/start/restart()`, and `received_before_marker()` tells that something did NOT arrive without
  waiting out a window. It listens for MQTT over TLS only, as
  `policycast broker-config` configures it, with a certificate from a CA of its own (`ca`, or the one
  given: a manager's) or the `certificates` given; `ssl_context` trusts exactly that CA, and its links
  and clients use it. `plain=True` gives a broker with a plaintext listener instead.
- `MqttClient`: a plain paho MQTT 5 client (an agent, an intruder) whose calls return reason codes, so
  that tests can assert what the broker allowed; `protocol="3.1.1"` for NATS (clean session).
- `Inbox`: a `BrokerLink.subscribe` handler that keeps what arrives.
- `mosquitto`: a function-scoped fixture giving a fresh, started `Broker`. Register it with
  `pytest_plugins = ["tests.support.broker"]` in the top-level conftest, or import it into a conftest.
"""

from __future__ import annotations

import queue
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import SecretStr

from broker_bridge.broker import BrokerLink
from broker_bridge.engine import BrokerLaunch, TlsListener
from broker_bridge.errors import BrokerUnavailable
from broker_bridge.mosquitto import accounts, bulk
from broker_bridge.mosquitto.config import BrokerLayout
from broker_bridge.mosquitto.engine import MosquittoEngine
from broker_bridge.mosquitto.install import find_dynsec_plugin, mosquitto_binary
from fabric_core.settings import MqttAddress, Settings
from fabric_core.tls import ManagerCA, client_context
from fabric_core.topics import DEFAULT_PREFIX
from fabric_core.wire import MqttProtocol
from local_stack.broker_process import BrokerProcess
from tests.support.processes import free_port

BRIDGE_USERNAME = "policycast-bridge"
TLS_BY_DEFAULT = True
"""A `Broker` listens for MQTT over TLS only unless told otherwise, as `broker-config` writes it."""
BROKER_NAMES = ("localhost", "127.0.0.1")


class Broker:
    """A Mosquitto of its own in `directory`, with dynamic security and the bridge's account."""

    def __init__(
        self,
        directory: Path,
        *,
        prefix: str = DEFAULT_PREFIX,
        plain: bool = not TLS_BY_DEFAULT,
        ca: ManagerCA | None = None,
        certificates: tuple[Path, Path] | None = None,
    ) -> None:
        self.prefix = prefix
        self.plain = plain and certificates is None and ca is None
        self.layout = BrokerLayout(directory)
        self.ca: ManagerCA | None = None
        self.tls: tuple[Path, Path] | None = None
        """(certfile, keyfile) of the MQTT-over-TLS listener (None: plaintext only)."""
        self.ssl_context: ssl.SSLContext | None = None
        """What a client verifies this broker with: exactly its CA (None: plaintext)."""
        if certificates is not None:
            self.tls = certificates
            self.ssl_context = client_context(certificates[0].read_bytes())
        elif not self.plain:
            self.ca = ca or ManagerCA.generate("policycast test CA")
            files = self.ca.server_files(directory / "tls", "broker", BROKER_NAMES)
            self.tls = (files.certfile, files.keyfile)
            self.ssl_context = client_context(self.ca.certificate_pem)
        self.bridge_username = BRIDGE_USERNAME
        self.bridge_password = secrets.token_urlsafe(18)
        settings = Settings(
            data_dir=directory,
            mqtt_prefix=prefix,
            mqtt_username=self.bridge_username,
            mqtt_password=SecretStr(self.bridge_password),
        )
        self.engine = MosquittoEngine(settings, None)  # the bridge's password is given: no signing key
        self.port = free_port()
        self.process = BrokerProcess(self._write_files())
        self._links: list[BrokerLink] = []
        self._clients: list[MqttClient] = []
        self._admin: BrokerLink | None = None

    def _write_files(self) -> BrokerLaunch:
        """The project's own broker configuration, as `policycast broker-config` writes it: one TLS
        listener (or, with `plain`, one plaintext listener)."""
        if self.tls is None:
            return self.engine.write_config(
                self.layout.directory, bind="127.0.0.1", tls=None, plain_port=self.port
            )
        tls = TlsListener(self.port, *self.tls)
        return self.engine.write_config(self.layout.directory, bind="127.0.0.1", tls=tls)

    @property
    def address(self) -> MqttAddress:
        return MqttAddress("127.0.0.1", self.port, tls=self.tls is not None)

    @property
    def url(self) -> str:
        return self.address.url

    @property
    def tls_address(self) -> MqttAddress:
        """The MQTT-over-TLS listener (not with `plain`)."""
        assert self.tls is not None, "this broker listens in plaintext: Broker(..., plain=False)"
        return self.address

    def start(self) -> Broker:
        try:
            self.process.start()
        except BrokerUnavailable:
            if self.process.running or "Address already in use" not in self.process.log_tail():
                raise
            # Another process took the free port between the probe and the bind: pick another one.
            self.port = free_port()
            self.process = BrokerProcess(self._write_files())
            self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def restart(self) -> None:
        self.process.restart()

    def link(self, client_id: str | None = None, *, timeout: float = 10.0) -> BrokerLink:
        """A connected `BrokerLink` with the bridge's credentials, closed by `close()`."""
        link = BrokerLink(
            self.address,
            username=self.bridge_username,
            password=self.bridge_password,
            client_id=client_id or f"bridge-{secrets.token_hex(4)}",
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
            ssl_context=self.ssl_context,
        )
        self._links.append(link)
        link.connect(timeout)
        return link

    @property
    def admin(self) -> BrokerLink:
        """One bridge link kept for provisioning."""
        if self._admin is None:
            self._admin = self.link("test-provisioner")
        return self._admin

    def provision(self, agent_id: str, group_id: str | int) -> str:
        """Create (or reset) the agent's account; return its password."""
        password = secrets.token_urlsafe(18)
        accounts.provision_agent(
            self.admin, prefix=self.prefix, agent_id=agent_id, group_id=group_id, password=password
        )
        return password

    def provision_many(self, agents: Mapping[str, str | int]) -> dict[str, str]:
        """Write these agents' accounts ({agent id: group id}) straight into the broker's dynamic-security
        file, as a fleet is provisioned at once (`broker_bridge.mosquitto.bulk`: O(N), where the control
        API is O(N^2) on Mosquitto 2.0.11); return their passwords. Best before `start()`: a running
        broker is stopped for the write and started again, which disconnects its clients."""
        passwords = {agent_id: secrets.token_urlsafe(18) for agent_id in agents}
        running = self.process.running
        if running:
            self.stop()
        bulk.write_agent_accounts(
            self.layout,
            prefix=self.prefix,
            agents=[(agent_id, group_id, passwords[agent_id]) for agent_id, group_id in agents.items()],
        )
        if running:
            self.start()
        return passwords

    def publish_marker(self, topic: str) -> bytes:
        """Publish a unique, non-retained marker on `topic` with the bridge's account; return it."""
        marker = f"marker-{secrets.token_hex(6)}".encode()
        self.admin.publish(topic, marker, qos=1, retain=False)
        return marker

    def received_before_marker(
        self, client: MqttClient, topic: str, *, timeout: float = 5.0
    ) -> list[Received]:
        """What `client` receives before a marker published now on `topic` reaches it.

        The broker queues messages to a subscriber in the order it takes them in, so once the marker
        arrives, everything the broker had taken in for `client` before it (a retained document after a
        SUBACK, anything an earlier acknowledged publish sent) has arrived too: a negative check ("nothing
        came") without a fixed window. `client` must read `topic` (subscribed, allowed to).
        """
        marker = self.publish_marker(topic)
        got = client.received_until(lambda got: bool(got) and got[-1].payload == marker, timeout=timeout)
        return got[:-1]

    def client(self, username: str | None, password: str | None, client_id: str | None = None) -> MqttClient:
        """An MQTT 5 client (not yet connected) that trusts this broker, closed by `close()`."""
        client = MqttClient(self.address, username, password, client_id, ssl_context=self.ssl_context)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for link in self._links:
            link.close()
        self.stop()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class MqttClient:
    """A paho MQTT 5 client for tests: each call waits for the broker's answer and returns its reason."""

    def __init__(
        self,
        address: MqttAddress,
        username: str | None,
        password: str | None,
        client_id: str | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        protocol: MqttProtocol = "5",
    ) -> None:
        # An agent account is bound to its own client id: connect under it unless told otherwise.
        self.client_id = client_id or username or f"test-{secrets.token_hex(4)}"
        self.protocol = protocol
        v5 = protocol == "5"
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,  # 3.1.1 (NATS): a clean session
            reconnect_on_failure=False,
        )
        if username is not None:
            self.paho.username_pw_set(username, password)
        if address.tls:
            self.paho.tls_set_context(ssl_context or ssl.create_default_context())
        self.address = address
        self.messages: queue.Queue[Received] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self._answers: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_publish = self._on_publish
        self.paho.on_message = self._on_message

    def will(self, topic: str, payload: bytes, *, retain: bool = True) -> MqttClient:
        self.paho.will_set(topic, payload, qos=1, retain=retain)
        return self

    # callbacks (network thread)

    def _on_connect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: Properties | None
    ) -> None:
        with self._cond:
            self._connack = rc
            self._cond.notify_all()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self.disconnects.put(rc)
        with self._cond:
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, rcs: list[ReasonCode], _p: object) -> None:
        self._answer(mid, rcs[0])

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        self._answer(mid, rc)

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(message.topic, bytes(message.payload), bool(message.retain)))

    def _answer(self, mid: int, rc: ReasonCode) -> None:
        with self._cond:
            self._answers[mid] = rc
            self._cond.notify_all()

    def _wait_answer(self, mid: int, timeout: float, what: str) -> ReasonCode:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._answers or not self.paho.is_connected(), timeout):
                raise AssertionError(f"no answer to {what} within {timeout}s")
            if mid not in self._answers:
                raise AssertionError(f"disconnected while waiting for the answer to {what}")
            return self._answers.pop(mid)

    # calls

    def connect(self, *, clean_start: bool = True, timeout: float = 5.0) -> ReasonCode:
        """CONNECT and return the CONNACK reason (success or why not)."""
        self._connack = None
        if self.protocol == "5":
            self.paho.connect(self.address.host, self.address.port, keepalive=30, clean_start=clean_start)
        else:
            self.paho.connect(self.address.host, self.address.port, keepalive=30)
        self.paho.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._connack is not None, timeout):
                raise AssertionError(f"no CONNACK within {timeout}s")
            assert self._connack is not None
            return self._connack

    def subscribe(self, topic_filter: str, *, qos: int | None = None, timeout: float = 5.0) -> ReasonCode:
        """SUBSCRIBE and return the SUBACK reason (granted QoS or a failure). QoS unless told: what
        agents use, 1 on MQTT 5 (Mosquitto), 0 on 3.1.1 (NATS: a QoS 1 subscription is a JetStream
        consumer, which agents may not make)."""
        if qos is None:
            qos = 1 if self.protocol == "5" else 0
        if self.protocol == "5":
            rc, mid = self.paho.subscribe(topic_filter, options=SubscribeOptions(qos=qos))
        else:
            rc, mid = self.paho.subscribe(topic_filter, qos=qos)
        assert rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None, mqtt.error_string(rc)
        return self._wait_answer(mid, timeout, f"subscribe {topic_filter}")

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 5.0
    ) -> ReasonCode:
        """PUBLISH at QoS 1 and return the PUBACK reason."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        return self._wait_answer(info.mid, timeout, f"publish {topic}")

    def expect(self, topic: str, *, timeout: float = 5.0) -> Received:
        """The next message on `topic` (others received meanwhile are dropped)."""
        got = self.received_until(lambda got: bool(got) and got[-1].topic == topic, timeout=timeout)
        return got[-1]

    def received_until(
        self, done: Callable[[list[Received]], bool], *, timeout: float = 10.0
    ) -> list[Received]:
        """Everything received until `done` holds for what has arrived (an error if it never does)."""
        deadline = time.monotonic() + timeout
        got: list[Received] = []
        while not done(got):
            remaining = deadline - time.monotonic()
            try:
                got.append(self.messages.get(timeout=max(remaining, 0.0)))
            except queue.Empty:
                raise AssertionError(
                    f"{self.client_id}: still waiting after {timeout}s; received {got}"
                ) from None
        return got

    def wait_disconnected(self, *, timeout: float = 5.0) -> ReasonCode:
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id} was not disconnected within {timeout}s") from None

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


class Inbox:
    """A `BrokerLink.subscribe` handler that keeps what arrives, for tests to wait on or rule out."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.items.append((topic, payload))
            self._cond.notify_all()

    def wait_for(self, topic: str, payload: bytes, *, timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: (topic, payload) in self.items, timeout):
                raise AssertionError(f"{payload!r} never arrived on {topic}; got {self.items}")

    def wait_count(self, count: int, *, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.items) >= count, timeout):
                raise AssertionError(f"{len(self.items)} of {count} messages arrived within {timeout}s")
            return list(self.items)


def require_mosquitto() -> None:
    """Fail (never skip) when this machine has no Mosquitto 2 with dynamic security."""
    try:
        mosquitto_binary()
        find_dynsec_plugin()
    except BrokerUnavailable as exc:
        pytest.fail(
            f"these tests need a real Mosquitto 2 broker: {exc}.\nRun `apt-get install -y mosquitto`.",
            pytrace=False,
        )


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A fresh Mosquitto per test, on a free port, with dynamic security and the bridge's account."""
    require_mosquitto()
    broker = Broker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()
